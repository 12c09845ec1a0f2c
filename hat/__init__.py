"""An image-text retrieval toolkit: HAT and Multi-SEA, one training loop, one evaluation
protocol.

Shared modules (they import no model): `hat.plugins` (what a model provides, the
registry), `hat.loop` (training), `hat.evaluation` (encoding loaders, ranks, the recall protocol,
folds), `hat.checkpoint` (checkpoint I/O), `hat.distributed`, `hat.backbones`
(where backbones and tokenizers come from), `hat.run_folders`. Models: `hat.models.hat`,
`hat.models.multisea`, registered in `hat.models` (imported by the registry's first
lookup, and by any import of a model module).

    import hat
    retriever = hat.load_model("runs/3/best.ckpt")   # see hat.retrieval

``import hat`` itself is light (the run browser and the curves need no torch); the
public names load on first use.
"""
import warnings

__all__ = ["Retriever", "load_model"]

# sacred 0.8.7 imports pkg_resources, which setuptools marks as deprecated: a warning at
# the start of every command that says nothing about the run
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)


def __getattr__(name):
    if name in __all__:
        from hat import retrieval

        return getattr(retrieval, name)
    raise AttributeError(f"module 'hat' has no attribute {name!r}")
