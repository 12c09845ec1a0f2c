"""Use a trained model anywhere: `load_model` reads a checkpoint (the project's own, or
the authors' released HAT / Multi-SEA files) and returns a `Retriever` that encodes
pictures and sentences and scores or searches them, with the same code the runner
evaluates with.

    import hat
    retriever = hat.load_model("runs/3/best.ckpt")                # the architecture it records
    images = retriever.encode_images(["a.jpg", "b.jpg"])          # paths or PIL images
    texts = retriever.encode_texts(["a dog on a beach"])
    retriever.score(images, texts)                                # [N_images, N_texts]
    retriever.search(["a dog on a beach"], ["a.jpg", "b.jpg"], k=1)  # [[(index, score)]]

One caption (a str) is one text and one path or PIL image is one picture: the calls take
either one or a list of them. An empty list, a caption that is not a str, an image that
is not a path or PIL image, a missing file or one that does not decode is refused with a
one-line error naming it. Files are opened with `hat.images.open_image` (EXIF orientation
applied, transparency over white; a PIL image passed in goes through the same
`hat.images.to_rgb`): the pixels the search index (`hat.search`) encodes.
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.datasets import caption_loader, image_loader, pad_id_of, tokenize
from datamodules.transforms import build_transform
from hat.backbones import load_tokenizer
from hat.checkpoint import (FORMAT, CheckpointError, check_project_layout, load_model_weights,
                            read_checkpoint_file)
from hat.checks import RUN_KEYS, validate_device
from hat.defaults import default_config
from hat.images import open_image, to_rgb
from hat.plugins import ConfigProblem, get_plugin, model_names, plugins

PATHS = (str, os.PathLike)


class _Images(Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = list(images), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        return self.transform(open_image(image, index) if isinstance(image, PATHS) else to_rgb(image))


def _image_list(images) -> list:
    """``images`` as a list of paths and PIL images: one path (str or os.PathLike) or PIL
    image is one picture; a list, tuple or other iterable of them is taken as given."""
    if isinstance(images, (*PATHS, Image.Image)):
        return [images]
    if isinstance(images, (torch.Tensor, bytes, dict)) or not hasattr(images, "__iter__"):
        raise TypeError(f"images has type {type(images).__name__}; pass a file path, a PIL image or a list of them "
                        f"(search also takes the features encode_images returns)")
    images = list(images)
    for index, image in enumerate(images):
        if not isinstance(image, (*PATHS, Image.Image)):
            raise TypeError(f"images[{index}] has type {type(image).__name__}, not a file path or PIL image; "
                            f"pass paths or PIL images")
    if not images:
        raise ValueError("images is empty; pass at least one file path or PIL image")
    return images


def _text_list(texts, name: str = "texts") -> list[str]:
    """``texts`` as a list of captions: one str is one caption; a list, tuple or other
    iterable of str is taken as given. ``name``: the argument the errors name."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"{name} has type {type(texts).__name__}; pass a caption (str) or a list of captions")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] has type {type(text).__name__}, not str; pass every caption as a str")
    if not texts:
        raise ValueError(f"{name} is empty; pass at least one caption")
    return texts


class _Texts(Dataset):
    def __init__(self, texts, tokenizer, max_text_len: int):
        self.texts, self.tokenizer, self.max_text_len = list(texts), tokenizer, max_text_len

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, index):
        return tokenize(self.tokenizer, self.texts[index], self.max_text_len)


class Retriever:
    """A loaded model with its image transform and tokenizer. ``config`` is the
    configuration it was built from; ``info`` says what was loaded."""

    def __init__(self, plugin, model, tokenizer, device, info: dict):
        c = plugin.c
        self.plugin, self.model, self.tokenizer, self.device, self.info = plugin, model, tokenizer, device, info
        self.config = c
        self.transform = build_transform(c["image_transform"], c["image_size"], train=False)
        self.batch_size = c["eval_batch_size"]

    def encode_images(self, images):
        """Encode pictures (a file path or PIL image, or a list of them) with the
        test-time transform."""
        loader = image_loader(_Images(_image_list(images), self.transform), self.batch_size, 0)
        return self.plugin.encode_image_set(self.model, loader, self.device)

    def encode_texts(self, texts):
        """Encode sentences (a str, or a list of them), tokenised and padded as the runner
        does."""
        dataset = _Texts(_text_list(texts), self.tokenizer, self.config["max_text_len"])
        loader = caption_loader(dataset, self.batch_size, 0,
                                pad_id=pad_id_of(self.tokenizer), pad_to=self.plugin.pad_to)
        return self.plugin.encode_caption_set(self.model, loader, self.device)

    def score(self, image_features, text_features, rerank: bool = False) -> torch.Tensor:
        """Scores [N_images, N_texts], higher = a better match: HAT's summed level scores
        in the checkpoint's direction; Multi-SEA's ITC scores, or with ``rerank=True`` the
        text->image scores re-ranked by ITM (each text's top_k images)."""
        return self.plugin.score_sets(self.model, image_features, text_features, rerank=rerank).float()

    def search(self, query_texts, images, k: int = 5, rerank: bool = False) -> list[list[tuple[int, float]]]:
        """For each query, the ``k`` best of ``images`` as (index into images, score), best
        first. ``query_texts``: a str or a list of them; ``images``: a path or PIL image, a
        list of them, or the features `encode_images` returns."""
        query_texts = _text_list(query_texts, "query_texts")
        image_features = images if _is_features(images) else self.encode_images(images)
        scores = self.score(image_features, self.encode_texts(query_texts), rerank=rerank)  # [N_images, N_queries]
        top = scores.t().topk(min(k, scores.shape[0]), dim=1)
        return [[(int(i), float(v)) for i, v in zip(indices, values)]
                for indices, values in zip(top.indices, top.values)]


def _is_features(images) -> bool:
    """Whether ``images`` is what `encode_images` returns: a non-empty list or tuple of
    tensors (HAT's per-level features, Multi-SEA's (f_I, F_I)). Anything else is pictures."""
    return isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(x, torch.Tensor) for x in images)


def load_model(checkpoint: str, device="cpu", model: str | None = None, dataset: str = "f30k",
               **overrides) -> Retriever:
    """Load ``checkpoint`` for retrieval: a `Retriever` with ``.model`` (eval mode),
    ``.transform``, ``.tokenizer``, `encode_images`, `encode_texts`, `score`, `search`.

    A project checkpoint records its configuration: the architecture, tokenizer and data
    settings come from it (``overrides`` change keys, e.g. ``direction="t2i"``). An
    authors' released file records none: its model is recognised from its keys (or
    ``model=``) and built with the published recipe of ``model``/``dataset``. Nothing is
    downloaded but what the tokenizer needs (bert-base-uncased falls back to the
    packaged vocabulary offline)."""
    def bad_device(key, allowed):
        raise ValueError(f"device={device!r} is not valid; allowed: cpu, cuda or cuda:N")

    try:
        validate_device(str(device), bad_device)
    except ConfigProblem as error:  # no CUDA here, or no such CUDA device
        raise ValueError(str(error).replace(" or device=auto", "")) from None
    state = read_checkpoint_file(checkpoint)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        check_project_layout(state, checkpoint)
        recorded = {k: v for k, v in (state.get("config") or {}).items() if k not in RUN_KEYS}
        if not recorded.get("model"):
            raise CheckpointError(f"checkpoint={checkpoint} records no configuration; pass model= and the "
                                  f"keys it was trained with")
        if model is not None and model != recorded["model"]:
            raise CheckpointError(f"checkpoint={checkpoint} is a model={recorded['model']} checkpoint, not "
                                  f"model={model}")
        keys = {k: v for k, v in recorded.items() if k not in ("model", "dataset")}
        config = default_config(recorded["model"], recorded.get("dataset", dataset), **{**keys, **overrides})
    else:
        released = state.get("state_dict") if isinstance(state, dict) else None
        found = [p.name for p in plugins() if isinstance(released, dict) and p.is_released(released)]
        model = model or (found[0] if found else None)
        if model not in model_names():
            raise CheckpointError(f"checkpoint={checkpoint} is neither a {FORMAT} checkpoint nor a released "
                                  f"checkpoint of {' or '.join(model_names())}; pass model=")
        config = default_config(model, dataset, **overrides)
    config = {**config, "device": str(device)}
    plugin = get_plugin(config["model"])(config)
    network = plugin.build(pretrained=False).to(device)
    loaded = load_model_weights(network, checkpoint, state)
    del state
    network.eval()
    return Retriever(plugin, network, load_tokenizer(config["text_backbone"]), torch.device(device),
                     {"checkpoint": os.path.abspath(checkpoint), **loaded})
