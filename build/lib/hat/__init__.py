"""An image-text retrieval toolkit: HAT and Multi-SEA, one training loop, one evaluation
protocol.

Shared modules (they import no model): `hat.plugins` (what a model provides, the
registry), `hat.loop` (training), `hat.evaluation` (encoding, scoring protocol, recalls,
feature cache), `hat.checkpoint` (checkpoint I/O), `hat.distributed`, `hat.backbones`
(where backbones and tokenizers come from), `hat.run_folders`. Models: `hat.models.hat`,
`hat.models.multisea`, registered in `hat.models` (imported here, the package's public
face, and by any import of a model module).

    import hat
    retriever = hat.load_model("runs/3/best.ckpt")   # see hat.retrieval
"""
import hat.models  # noqa: F401  (registers the built-in models)
from hat.retrieval import Retriever, load_model

__all__ = ["Retriever", "load_model"]
