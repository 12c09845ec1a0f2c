"""What a model gives the toolkit, and where models are registered.

The training loop (`hat.loop`), the runner (run.py) and the checkpoint reader know no
model: they look a model up here by its name (config key ``model``) and call the
methods below. A model is a package of its own under ``hat/models/`` whose plug-in
subclasses `ModelPlugin`; ``hat/models/__init__.py`` registers the built-in ones, and a
model defined anywhere else (a test, a user's package) calls `register` itself.

Adding a model means writing one subclass of `ModelPlugin`:

========================  ==============================================================
``name``                  the value of ``model=`` that selects it
``config``                a Sacred config function (its keys exist only when this model
                          is selected; it may read ``model``, ``dataset``, ``demo_recipe``)
``build``                 the ``torch.nn.Module`` from the config (no files when
                          ``pretrained`` is False: the weights then come from a checkpoint)
``training_data``         the training ``Dataset`` of a split
``loss``                  one micro-batch -> dict of scalar losses; the loop backpropagates
                          ``["loss"]`` and logs the rest
``optimizer``             the optimizer over the model's parameter groups
``scheduler``             ``(scheduler, "step" | "epoch")``: stepped per optimizer step or
                          per epoch
``start_epoch``           the freezing schedule (what trains in this epoch)
``evaluate``              metrics of a split (validation and test: one path)
``encode_image_set`` /    encode images / captions once, and score the encoded sets
``encode_caption_set`` /  (what `hat.load_model` uses outside the runner; `evaluate`
``score_sets``            ranks the same matrix)
``gallery_attention``     optional: attention maps the gallery draws (``stage_labels``:
                          other stages whose ranks it shows)
``validate``              model-specific configuration checks (one-line errors)
``released_module``       the authors' released checkpoints: a module that recognises
                          and loads them
========================  ==============================================================

Everything else (mixed precision, gradient accumulation, DDP, clipping, checkpoints,
resume, signals, the recall protocol) belongs to the toolkit.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


class ConfigProblem(ValueError):
    """A configuration that cannot run; the message is one line naming the key and the fix."""


class ModelPlugin:
    """Base class of the model plug-ins: one instance per run, holding the run's
    configuration ``c`` (a plain dict)."""

    name: str = ""
    config = None  # a Sacred config function: the model's keys and defaults
    # captions padded to this many tokens (None: to the longest caption of the batch)
    pad_to: int | None = None
    # "captions": a training item is a (caption, its image) pair; "images": one image
    # with one of its captions (only used in the progress line)
    training_unit = "captions"

    def __init__(self, c: dict):
        self.c = c

    # the model's numeric keys: {key: hat.checks.Rule} (``integer(...)``, ``number(...)``),
    # checked before `validate` with the same one-line errors
    key_rules: dict = {}

    def validate(self, fail) -> None:
        """Model-specific configuration checks, before any work: ``fail(key, allowed)``
        raises the one-line error naming the key, its value and what is allowed; other
        problems raise `ConfigProblem` with a one-line message."""

    def build(self, pretrained: bool):
        raise NotImplementedError

    def training_data(self, split, tokenizer, transform):
        raise NotImplementedError

    def loss(self, network, model, batch: dict, epoch: int, gather=None) -> dict:
        """The losses of one micro-batch (tensors on the device): {"loss": scalar, ...}.
        ``network`` runs the forward (the DDP wrapper or ``model`` itself); ``gather``
        (under DDP) collects a tensor from every process."""
        raise NotImplementedError

    def optimizer(self, model):
        raise NotImplementedError

    def scheduler(self, optimizer, steps_per_epoch: int):
        """(scheduler, "step" | "epoch"); ``steps_per_epoch`` counts optimizer steps."""
        raise NotImplementedError

    def start_epoch(self, model, epoch: int) -> None:
        """Set what trains in ``epoch`` (the freezing schedule); default: everything
        that requires grad at build time."""

    def evaluate(self, model, data, device, options: "EvalOptions") -> dict:
        """Metrics of the split in ``data`` (a `hat.evaluation.EvalData`): at least the keys
        of `hat.evaluation.METRIC_KEYS`."""
        raise NotImplementedError

    def encode_image_set(self, model, loader, device):
        """Encode every image of ``loader`` once (eval mode) -> the model's image features."""
        raise NotImplementedError

    def encode_caption_set(self, model, loader, device):
        """Encode every caption of ``loader`` once (eval mode) -> the model's caption features."""
        raise NotImplementedError

    def score_sets(self, model, image_features, caption_features, rerank: bool = False):
        """Scores [N_images, N_captions] of encoded sets: the matrix `evaluate` ranks
        (``rerank``: a model's second, finer stage, where it has one: the text->image
        matrix)."""
        raise NotImplementedError

    # the gallery (hat.gallery): the other score matrices ``evaluate`` keeps (keep_scores),
    # shown as each result's rank under that stage, e.g. {"itc": "ITC"}
    stage_labels: dict = {}

    def gallery_attention(self, model, images, input_ids, attention_mask, device):
        """What the gallery draws for (image, caption) pairs (images [P, 3, H, W], captions
        [P, L]): per pair, a list per level of {"label", "direction", "weights": [n_words,
        regions] tensor} over the caption's real tokens; None: the model has no such maps."""
        return None

    def test_checkpoints(self) -> list:
        """What the final test of test_only=True evaluates: [checkpoint] by default."""
        return [self.c["checkpoint"]] if self.c["checkpoint"] else []

    # test_only with a project checkpoint takes its recorded configuration; a command-line
    # key that differs from it is refused when it is in architecture_keys (the weights
    # would not fit or mean something else), noted when it is in scoring_keys
    architecture_keys: tuple = ("text_backbone",)
    scoring_keys: tuple = ()

    # The authors' released checkpoints: a module with ``is_released(state_dict) -> bool``
    # (is a released Lightning file's state_dict this model's?) and
    # ``load_released_state_dict(model, state_dict) -> dict`` (map and load it); the format
    # name recorded for such files, and the keys that identify them (for messages).
    released_module: str | None = None
    released_format: str | None = None
    released_keys: str = ""

    @staticmethod
    def accepts(model) -> bool:
        """True when ``model`` is this plug-in's (released files load only into their own model)."""
        return True

    @classmethod
    def is_released(cls, state_dict: dict) -> bool:
        return cls.released_module is not None and importlib.import_module(cls.released_module).is_released(
            state_dict)

    @classmethod
    def load_released(cls, model, state_dict: dict) -> dict:
        return importlib.import_module(cls.released_module).load_released_state_dict(model, state_dict)


@dataclass
class EvalOptions:
    """How a split is evaluated. ``split``: "val" (during training) or "test" (the final
    test and test_only: a model may then apply its own test-time keys, such as per-level
    recalls, ensembles or a feature cache). ``checkpoints``: [] scores the model as it
    is; one path loads it first; several are an ensemble (models that support one).
    ``n_folds``: also the mean over that many consecutive folds (MSCOCO 1K). ``info`` is
    filled by `ModelPlugin.evaluate` with what it scored (checkpoint paths, formats) for
    the run's record."""

    split: str = "val"
    checkpoints: list = field(default_factory=list)
    n_folds: int | None = None
    info: dict = field(default_factory=dict)
    # keep_scores: fill ``scores`` with the matrices [N_images, N_captions] that were ranked:
    # "i2t" (image queries), "t2i" (caption queries), and a model's other stages
    keep_scores: bool = False
    scores: dict = field(default_factory=dict)


_PLUGINS: dict[str, type] = {}
_LISTENERS: list = []
_BUILTINS = "hat.models"  # registers the built-in models when imported


def _with_builtins() -> dict[str, type]:
    """The registry, the built-in models included (imported on the first lookup)."""
    importlib.import_module(_BUILTINS)
    return _PLUGINS


def register(plugin: type) -> type:
    """Register a `ModelPlugin` subclass under ``plugin.name`` (usable as a decorator).
    Registering a name again replaces the earlier plug-in."""
    if not plugin.name:
        raise ValueError(f"{plugin.__name__} has no name")
    _PLUGINS[plugin.name] = plugin
    for listener in _LISTENERS:
        listener(plugin)
    return plugin


def unregister(name: str) -> None:
    """Forget the plug-in registered under ``name`` (a test's temporary model)."""
    _PLUGINS.pop(name, None)


def on_register(listener) -> None:
    """Call ``listener(plugin)`` for every plug-in registered, now and later (config.py
    adds each model's config function to the experiment this way)."""
    _LISTENERS.append(listener)
    for plugin in list(_PLUGINS.values()):
        listener(plugin)


def get_plugin(name: str) -> type:
    return _with_builtins()[name]


def model_names() -> list[str]:
    return sorted(_with_builtins())


def plugins() -> list[type]:
    return list(_with_builtins().values())
