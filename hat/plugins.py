"""What a model gives the toolkit, and where models are registered.

The training loop (`hat.loop`), the runner (run.py) and the checkpoint reader know no
model: they look a model up here by its name (config key ``model``) and call the
methods below. A model is a package of its own under ``hat/models/`` whose plug-in
subclasses `ModelPlugin`; ``hat/models/__init__.py`` registers the built-in ones, and a
model defined anywhere else (a test, a user's package) calls `register` itself.

Adding a model means writing one subclass of `ModelPlugin` with a ``name`` and the six
abstract methods; every other member has a default (see the class for each one's doc):

========================  ==============================================================
required
``name``                  the value of ``model=`` that selects it
``build``                 the ``torch.nn.Module`` from the config (no files when
                          ``pretrained`` is False: the weights then come from a checkpoint)
``training_data``         the training ``Dataset`` of a split
``loss``                  one micro-batch -> dict of scalar losses; the loop backpropagates
                          ``["loss"]`` and logs the rest
``optimizer``             the optimizer over the model's parameter groups
``scheduler``             ``(scheduler, "step" | "epoch")``: stepped per optimizer step or
                          per epoch
``evaluate``              an `Evaluation` of a split: metrics, what was scored, and the
                          ranked matrices when asked (validation and test: one path)
optional
``config``                a Sacred config function (its keys exist only when this model
                          is selected; it may read ``model``, ``dataset``, ``demo_recipe``)
``title``, ``cuda_precision``, ``pad_to``, ``training_unit``, ``key_rules``,
``architecture_keys``, ``scoring_keys``, ``stage_labels``: values with defaults
``validate``              model-specific configuration checks (one-line errors)
``start_epoch``           the freezing schedule (what trains in this epoch)
``test_checkpoints``      what test_only evaluates (default: [checkpoint])
``table_rows``            the model's own lines under the printed test table
``encode_image_set`` /    encode images / captions once, and score the encoded sets
``encode_caption_set`` /  (what `hat.load_model` uses outside the runner; `evaluate`
``score_sets``            ranks the same matrix)
``gallery_attention``     attention maps the gallery draws
``encode_batch`` /        exact accumulation (``accumulation="exact"``): a micro-batch's
``loss_from_features``    features without the loss, and the loss of the whole optimizer
                          step's batch from every micro-batch's features (a plug-in without
                          them accumulates split only: each micro-batch its own ``loss``)
``released_module``       the authors' released checkpoints: a module that recognises
                          and loads them (with ``released_format``, ``released_keys``)
========================  ==============================================================

Everything else (mixed precision, gradient accumulation (split, or exact with the two
members above), DDP, clipping, checkpoints, resume, signals, the recall protocol) belongs
to the toolkit.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field


class ConfigProblem(ValueError):
    """A configuration that cannot run; the message is one line naming the key and the fix."""


@dataclass
class EvalOptions:
    """How a split is evaluated. ``split``: "val" (during training) or "test" (the final
    test and test_only: a model may then apply its own test-time keys, such as per-level
    recalls, ensembles or a feature cache). ``checkpoints``: [] scores the model as it
    is; one path loads it first; several are an ensemble (models that support one).
    ``n_folds``: also the mean over that many consecutive folds (MSCOCO 1K).
    ``keep_scores``: return the ranked score matrices too (`Evaluation.scores`)."""

    split: str = "val"
    checkpoints: list = field(default_factory=list)
    n_folds: int | None = None
    keep_scores: bool = False


@dataclass
class Evaluation:
    """What `ModelPlugin.evaluate` returns. ``metrics``: at least the keys of
    `hat.evaluation.METRIC_KEYS`; ``info``: what it scored (checkpoint paths, formats),
    for the run's record; ``scores`` (with ``keep_scores``): the matrices [N_images,
    N_captions] that were ranked, "i2t" (image queries), "t2i" (caption queries), and a
    model's other stages (`ModelPlugin.stage_labels`)."""

    metrics: dict
    info: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)


class ModelPlugin(abc.ABC):
    """Base class of the model plug-ins: one instance per run, holding the run's
    configuration ``c`` (a plain dict). The abstract members are required; every other
    member has the default written here."""

    # -- required --------------------------------------------------------------------
    name: str = ""  # required: the value of model= that selects this model

    @abc.abstractmethod
    def build(self, pretrained: bool):
        """The ``torch.nn.Module`` from the configuration (with ``pretrained`` False no file
        is read or downloaded: the weights then come from a checkpoint)."""

    @abc.abstractmethod
    def training_data(self, split, tokenizer, transform):
        """The training ``Dataset`` of an opened split (`datamodules.open_split`)."""

    @abc.abstractmethod
    def loss(self, network, model, batch: dict, epoch: int, gather=None) -> dict:
        """The losses of one micro-batch (tensors on the device): {"loss": scalar, ...}; the
        loop backpropagates ``["loss"]`` and logs the rest. ``network`` runs the forward
        (the DDP wrapper, or ``model`` itself), ``model`` is the bare module (for its own
        bookkeeping); ``gather`` (under DDP) collects a tensor from every process."""

    @abc.abstractmethod
    def optimizer(self, model):
        """The optimizer over the model's parameter groups."""

    @abc.abstractmethod
    def scheduler(self, optimizer, steps_per_epoch: int):
        """(scheduler, "step" | "epoch"): stepped per optimizer step or per epoch;
        ``steps_per_epoch`` counts optimizer steps."""

    @abc.abstractmethod
    def evaluate(self, model, data, device, options: EvalOptions) -> Evaluation:
        """The `Evaluation` of the split in ``data`` (a `hat.evaluation.EvalData`): validation
        and test go through this one path."""

    # -- optional, with their defaults ---------------------------------------------
    title: str = ""  # the model's name in printed text ("" : the name)
    config = None  # a Sacred config function: the model's keys and defaults (None: none)
    cuda_precision: str = "fp32"  # what precision=auto means on CUDA (fp16 | bf16 | fp32)
    pad_to: int | None = None  # captions padded to this many tokens (None: the batch's longest)
    training_unit: str = "captions"  # what one training item is: "captions" (a pair) or "images"
    key_rules: dict = {}  # the model's numeric keys: {key: hat.rules.Rule}, checked before validate
    # test_only with a project checkpoint takes its recorded configuration; a command-line
    # key that differs from it is refused when it is in architecture_keys (the weights
    # would not fit or mean something else), noted when it is in scoring_keys
    architecture_keys: tuple = ("text_backbone",)
    scoring_keys: tuple = ()
    # the gallery: the other score matrices evaluate keeps, shown as each result's rank
    # under that stage, e.g. {"itc": "ITC"}
    stage_labels: dict = {}
    # the authors' released checkpoints: a module with ``is_released(state_dict) -> bool``
    # and ``load_released_state_dict(model, state_dict) -> dict``; the format name recorded
    # for such files, and the keys that identify them (for messages); None: no such files
    released_module: str | None = None
    released_format: str | None = None
    released_keys: str = ""

    def __init__(self, c: dict):
        self.c = c

    @classmethod
    def display_name(cls) -> str:
        """``title``, or ``name`` where the model has no title."""
        return cls.title or cls.name

    def validate(self, fail) -> None:
        """Model-specific configuration checks, before any work: ``fail(key, allowed)``
        raises the one-line error naming the key, its value and what is allowed; other
        problems raise `ConfigProblem` with a one-line message. Default: none."""

    def start_epoch(self, model, epoch: int) -> None:
        """Set what trains in ``epoch`` (the freezing schedule). Default: everything that
        requires grad at build time."""

    def test_checkpoints(self) -> list:
        """What the final test of test_only=True evaluates: [checkpoint] by default."""
        return [self.c["checkpoint"]] if self.c["checkpoint"] else []

    def table_rows(self, metrics: dict) -> list[str]:
        """Lines the printed test table adds under the recalls (HAT: one per level). Default: none."""
        return []

    def encode_image_set(self, model, loader, device):
        """Encode every image of ``loader`` once (eval mode) -> the model's image features
        (what `hat.load_model` searches with). Default: not supported."""
        raise NotImplementedError(f"model={self.name} does not encode image sets (no encode_image_set)")

    def encode_caption_set(self, model, loader, device):
        """Encode every caption of ``loader`` once (eval mode) -> the model's caption
        features. Default: not supported."""
        raise NotImplementedError(f"model={self.name} does not encode caption sets (no encode_caption_set)")

    def score_sets(self, model, image_features, caption_features, rerank: bool = False):
        """Scores [N_images, N_captions] of encoded sets: the matrix `evaluate` ranks
        (``rerank``: a model's second, finer stage, where it has one: the text->image
        matrix). Default: not supported."""
        raise NotImplementedError(f"model={self.name} does not score encoded sets (no score_sets)")

    def gallery_attention(self, model, images, input_ids, attention_mask, device):
        """What the gallery draws for (image, caption) pairs (images [P, 3, H, W], captions
        [P, L]): per pair, a list per level of {"label", "direction", "weights": [n_words,
        regions] tensor} over the caption's real tokens. Default: None (no such maps)."""
        return None

    def encode_batch(self, network, model, batch: dict, first=None):
        """Exact accumulation: the features of one micro-batch that `loss_from_features`
        scores (nested dicts/lists/tuples of tensors; the floating-point ones receive the
        loss's gradients), from ``network``'s forward (so that it runs as the model's forward
        under DDP). Called twice per micro-batch under the same RNG state: without a graph
        (``first`` None), then with one (``first``: what the first call returned, detached),
        and it must draw the same random numbers both times. The second call may take from
        ``first`` what needs no gradient (a frozen encoder's output) instead of computing it
        again, provided nothing random runs after what it skips. Default: not supported
        (split only)."""
        raise NotImplementedError(f"model={self.name} has no encode_batch: it supports accumulation=split only")

    def loss_from_features(self, model, features: list, batches: list, epoch: int, gather=None) -> dict:
        """Exact accumulation: the losses of the whole optimizer-step batch, as `loss` gives
        them for one micro-batch, from ``features[i]`` (`encode_batch` of micro-batch
        ``batches[i]``, in order); ``gather`` (under DDP) collects every process's. Default:
        not supported."""
        raise NotImplementedError(f"model={self.name} has no loss_from_features: it supports accumulation=split only")

    @classmethod
    def supports_exact(cls) -> bool:
        """Whether the plug-in has both members exact accumulation needs (its own
        `encode_batch` and `loss_from_features`)."""
        return all(getattr(cls, name) is not getattr(ModelPlugin, name)
                   for name in ("encode_batch", "loss_from_features"))

    @staticmethod
    def accepts(model) -> bool:
        """True when ``model`` is this plug-in's (released files load only into their own
        model). Default: any model."""
        return True

    @classmethod
    def is_released(cls, state_dict: dict) -> bool:
        """Is a released Lightning file's ``state_dict`` this model's (`released_module`)?"""
        return cls.released_module is not None and importlib.import_module(cls.released_module).is_released(
            state_dict)

    @classmethod
    def load_released(cls, model, state_dict: dict) -> dict:
        """Map a released ``state_dict`` onto ``model`` and load it (`released_module`)."""
        return importlib.import_module(cls.released_module).load_released_state_dict(model, state_dict)


_PLUGINS: dict[str, type] = {}
_LISTENERS: list = []
_BUILTINS = "hat.models"  # registers the built-in models when imported


def _with_builtins() -> dict[str, type]:
    """The registry, the built-in models included (imported on the first lookup)."""
    importlib.import_module(_BUILTINS)
    return _PLUGINS


def register(plugin: type) -> type:
    """Register a `ModelPlugin` subclass under ``plugin.name`` (usable as a decorator). A
    name already taken by another plug-in, no name, or a required member left abstract
    is refused in one line (`unregister` frees a name)."""
    where = f"{plugin.__module__}.{plugin.__qualname__}"
    if not plugin.name:
        raise ValueError(f"{where} has no name: set its `name` (the value of model= that selects it)")
    missing = sorted(getattr(plugin, "__abstractmethods__", ()))
    if missing:
        raise ValueError(f"{where} (model={plugin.name}) lacks the required member(s) {', '.join(missing)}: "
                         f"see hat.plugins.ModelPlugin")
    earlier = _PLUGINS.get(plugin.name)
    if earlier is not None and earlier is not plugin:
        raise ValueError(f"model name {plugin.name!r} is taken by {earlier.__module__}.{earlier.__qualname__}; "
                         f"{where} cannot be registered under it (rename it, or unregister the other first)")
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
