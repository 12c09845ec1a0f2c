"""An image-text retrieval toolkit: HAT and Multi-SEA, one training loop, one evaluation
protocol.

Shared modules (they import no model): `hat.plugins` (what a model provides, the
registry), `hat.loop` (training), `hat.evaluation` (encoding, scoring protocol, recalls,
feature cache), `hat.checkpoint` (checkpoint I/O), `hat.distributed`, `hat.backbones`
(where backbones and tokenizers come from), `hat.run_folders`. Models: `hat.models.hat`,
`hat.models.multisea`, registered in `hat.models` (imported by config.py, and by any
import of a model module).
"""
