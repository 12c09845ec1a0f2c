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
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.datasets import caption_loader, image_loader, pad_id_of, tokenize
from datamodules.transforms import build_transform
from hat.backbones import load_tokenizer
from hat.checkpoint import FORMAT, CheckpointError, load_model_weights, read_checkpoint_file
from hat.checks import RUN_KEYS
from hat.defaults import default_config
from hat.plugins import get_plugin, model_names, plugins

class _Images(Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = list(images), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        return self.transform(image.convert("RGB"))


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
        """Encode pictures (PIL images or file paths) with the test-time transform."""
        loader = image_loader(_Images(images, self.transform), self.batch_size, 0)
        return self.plugin.encode_image_set(self.model, loader, self.device)

    def encode_texts(self, texts):
        """Encode sentences (tokenised and padded as the runner does)."""
        loader = caption_loader(_Texts(texts, self.tokenizer, self.config["max_text_len"]), self.batch_size, 0,
                                pad_id=pad_id_of(self.tokenizer), pad_to=self.plugin.pad_to)
        return self.plugin.encode_caption_set(self.model, loader, self.device)

    def score(self, image_features, text_features, rerank: bool = False) -> torch.Tensor:
        """Scores [N_images, N_texts], higher = a better match: HAT's summed level scores
        in the checkpoint's direction; Multi-SEA's ITC scores, or with ``rerank=True`` the
        text->image scores re-ranked by ITM (each text's top_k images)."""
        return self.plugin.score_sets(self.model, image_features, text_features, rerank=rerank).float()

    def search(self, query_texts, images, k: int = 5, rerank: bool = False) -> list[list[tuple[int, float]]]:
        """For each query, the ``k`` best of ``images`` as (index into images, score), best
        first. ``images``: PIL images, paths, or features from `encode_images`."""
        if isinstance(query_texts, str):
            query_texts = [query_texts]
        image_features = images if _is_features(images) else self.encode_images(images)
        scores = self.score(image_features, self.encode_texts(query_texts), rerank=rerank)  # [N_images, N_queries]
        top = scores.t().topk(min(k, scores.shape[0]), dim=1)
        return [[(int(i), float(v)) for i, v in zip(indices, values)]
                for indices, values in zip(top.indices, top.values)]


def _is_features(images) -> bool:
    return not isinstance(images, (list, tuple)) or (len(images) > 0 and isinstance(images[0], torch.Tensor))


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
    state = read_checkpoint_file(checkpoint)
    if isinstance(state, dict) and state.get("format") == FORMAT:
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
