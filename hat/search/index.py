"""Query a search index (`SearchIndex`): the Retriever of the manifest's checkpoint (its
content checked against the manifest's digest) and every indexed picture's features in
memory, as ``encode_image_set`` returned them.

`SearchIndex.search` scores all queries against all pictures in one call of
`Retriever.search` on the stored features, with ``rerank=True``: the plug-in's final
ranking (Multi-SEA: ITC over every picture, then the ITM re-rank of each query's top_k;
HAT has one stage, its summed level scores, and ignores the flag). So the results are
those of ``Retriever.search(queries, files, k, rerank=True)`` on the same files (what
this relies on: the index was built and is queried on the same kind of device; the
features keep the dtype they were encoded in, half precision widened to float32 on the
CPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hat.fingerprint import FingerprintMemo
from hat.images import open_image
from hat.search.build import config_difference, load_retriever
from hat.search.checks import SearchError, check_k, check_text
from hat.search.store import MEMO, load_features, read_manifest

SHOWN_CHARS = 60  # of a query or path quoted in a message


@dataclass
class Hit:
    """One result: the picture's path relative to the index's root, its score (higher =
    a better match) and its position in ``SearchIndex.paths``."""

    path: str
    score: float
    index: int


@dataclass
class Hits:
    """The results of one query, best first, and a note (the query was truncated) or None."""

    results: list[Hit]
    note: str | None = None


def _quoted(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


class SearchIndex:
    """An opened index (`open`): ``root`` (the absolute image folder), ``paths`` (relative
    paths, index order), ``model_name``, ``retriever``, ``features`` (what
    ``encode_image_set`` returns, over ``paths``; None for an index without pictures),
    ``manifest`` and ``folder``."""

    def __init__(self, folder: str, manifest: dict, retriever, features):
        self.folder, self.manifest, self.retriever, self.features = folder, manifest, retriever, features
        self.root = manifest["root"]
        self.paths = [entry["path"] for entry in manifest["files"]]
        self.model_name = manifest["model"]
        self._positions = {path: index for index, path in enumerate(self.paths)}
        self._faiss = None  # the shortlist's first stage, built when a search asks for it

    @classmethod
    def open(cls, folder, device="cpu") -> SearchIndex:
        """Open the index in ``folder`` on ``device``: the manifest, the checkpoint it names
        (refused when its content no longer has the manifest's digest), the features."""
        folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
        build = f"build it with: python -m hat.search index --checkpoint CKPT --images DIR --out {folder}"
        manifest = read_manifest(folder, build)
        checkpoint = manifest["checkpoint"]["path"]
        again = (f"python -m hat.search index --checkpoint CKPT --images {manifest['root']} --out {folder} "
                 f"--rebuild")
        if not os.path.isfile(checkpoint):
            raise SearchError(f"index {folder} was built with checkpoint {checkpoint}, which no longer exists; put "
                              f"it back, or index the pictures again with another checkpoint: {again}")
        digest = FingerprintMemo(os.path.join(folder, MEMO)).digest(checkpoint)  # the memo is read, not written
        if digest != manifest["checkpoint"]["digest"]:
            raise SearchError(f"checkpoint {checkpoint} has changed since index {folder} was built with it (content "
                              f"{manifest['checkpoint']['digest'][:12]}, now {digest[:12]}); encode the pictures "
                              f"again: {again.replace('CKPT', checkpoint)}")
        retriever = load_retriever(checkpoint, device)
        difference = config_difference(manifest.get("config") or {}, retriever.config, retriever.plugin)
        if difference:
            raise SearchError(f"checkpoint {checkpoint} now loads with another configuration than index {folder} "
                              f"was built with ({difference}); encode the pictures again: "
                              f"{again.replace('CKPT', checkpoint)}")
        features = None
        if manifest["files"]:
            update = again.replace("CKPT", checkpoint).removesuffix(" --rebuild")
            features = load_features(folder, manifest, f"run the index command again (it encodes the pictures of "
                                                       f"missing or damaged shards): {update}")
            cpu = retriever.device.type == "cpu"
            features = [f.to(retriever.device, torch.float32 if cpu and f.dtype in (torch.float16, torch.bfloat16)
                             else f.dtype) for f in features]
            features = tuple(features) if manifest["features"]["container"] == "tuple" else features
        return cls(folder, manifest, retriever, features)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"SearchIndex({self.folder!r}: {len(self)} pictures under {self.root}, model={self.model_name})"

    # -- queries ----------------------------------------------------------------------

    def check_query(self, query) -> str | None:
        """Refuse a query that cannot be searched (`check_text`; or one the tokenizer
        reads no word of); -> a note when it is longer than the model reads
        (max_text_len tokens: the rest is left out), else None."""
        check_text(query)
        tokenizer, limit = self.retriever.tokenizer, self.retriever.config["max_text_len"]
        ids = tokenizer(query, verbose=False)["input_ids"]
        if len(ids) <= 2:  # [CLS] [SEP] only
            raise SearchError(f"the query {_quoted(query)} has no word the model's tokenizer reads; pass some words")
        if len(ids) <= limit:
            return None
        left_out = tokenizer.decode(ids[limit - 1:-1])
        return (f"the query is {len(ids) - 2} word pieces long and the model reads the first {limit - 2} "
                f"(max_text_len={limit}): {_quoted(left_out)} was left out")

    def check_k(self, k) -> int:
        return check_k(k)

    def search(self, queries, k: int, shortlist: int | None = None) -> list[Hits]:
        """The ``k`` best pictures of every query (a list of str; one str is one query),
        best first, scored in one call for all queries together. ``shortlist`` (opt-in,
        for large collections; None: every picture scored exactly): a FAISS first stage
        picks candidates (`hat.search.shortlist`, the index kind the manifest records):
        HAT scores ``shortlist`` of them exactly; Multi-SEA re-ranks its ITC top_k by ITM
        (``shortlist`` is then unused beyond switching the ITC stage to FAISS, and a query
        gets at most top_k results: the re-ranked ones)."""
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, (bytes, bytearray)) or not isinstance(queries, (list, tuple)):
            raise SearchError(f"queries has type {type(queries).__name__}; pass a list of str")
        if not queries:
            raise SearchError("no queries; pass at least one")
        notes = [self.check_query(query) for query in queries]
        k = self.check_k(k)
        if self.features is None:
            return [Hits([], note) for note in notes]
        if shortlist is None:
            ranked = self.retriever.search(list(queries), self.features, k=k, rerank=True)
        else:
            ranked = self._shortlisted(list(queries), k, check_k(shortlist, "shortlist"))
        return [Hits([Hit(self.paths[index], score, index) for index, score in hits], note)
                for hits, note in zip(ranked, notes)]

    def _shortlisted(self, queries: list[str], k: int, m: int) -> list[list[tuple[int, float]]]:
        """(index, score) of each query's top k through the shortlist (see `search`)."""
        from hat.search import shortlist as S

        retriever = self.retriever
        texts = retriever.encode_texts(queries)
        if self._faiss is None:  # built on first use, of the kind the manifest records
            vectors = (S.itc_image_vectors(self.features) if isinstance(self.features, tuple)
                       else S.pooled_image_vectors(self.features))
            plan = self.manifest.get("shortlist") or {}
            self._faiss, _ = S.build_faiss(vectors, plan.get("faiss_index", "auto"))
        if isinstance(self.features, tuple):
            found = S.multisea_shortlisted_scores(retriever.model, self.features, texts,
                                                  k=retriever.config["top_k"], index=self._faiss)
        else:
            found = S.shortlisted_scores(retriever.model, self.features, texts, m=m, k=k, index=self._faiss,
                                         image_tile=retriever.config["image_tile"],
                                         caption_tile=retriever.config["caption_tile"])
        return [[(int(i), float(v)) for i, v in zip(indices[:k], values[:k])]
                for indices, values in zip(found.indices, found.values)]

    # -- pictures ---------------------------------------------------------------------

    def resolve(self, path) -> str:
        """The absolute path of the indexed picture ``path`` (one of ``paths``); anything
        else (another file, an absolute path, '..') is a SearchError."""
        if not isinstance(path, str) or path not in self._positions:
            shown = _quoted(path) if isinstance(path, str) else type(path).__name__
            raise SearchError(f"{shown} is not a picture of index {self.folder}; pass one of its paths "
                              f"(relative to {self.root})")
        return os.path.join(self.root, *path.split("/"))

    def open_picture(self, path):
        """The indexed picture ``path`` as the model sees it before its transform (RGB,
        EXIF orientation applied); SearchError when it cannot be read now."""
        file = self.resolve(path)
        try:
            return open_image(file)
        except (OSError, ValueError) as error:
            raise SearchError(" ".join(str(error).split())) from None

    def view(self, path):
        """The picture as the model saw it (the geometric part of the test-time transform,
        a PIL image): what `attention`'s maps lie over (`hat.gallery.heatmap`)."""
        from datamodules.transforms import view_transform

        c = self.retriever.config
        return view_transform(c["image_transform"], c["image_size"])(self.open_picture(path))

    def attention(self, query: str, path: str) -> list[dict]:
        """HAT's word-region attention for (``query``, picture ``path``), one dict per level
        as the gallery draws it (`hat.gallery.attention_pairs`): {"label", "direction",
        "grid": [rows, columns] of the regions, "words": the query's tokens (one map each),
        "weights": [n_words][regions], "scale_max": the row's largest weight}. Draw each
        map with ``hat.gallery.heatmap(index.view(path), weights[w], grid, scale_max=...)``.
        A model without such maps (Multi-SEA) is a SearchError."""
        from datamodules.datasets import pad_id_of, pad_token_ids, tokenize
        from hat.gallery import region_grid
        from hat.plugins import ModelPlugin

        self.check_query(query)
        retriever = self.retriever
        no_maps = f"model={self.model_name} ({retriever.plugin.title}) has no attention maps; only HAT draws them"
        if type(retriever.plugin).gallery_attention is ModelPlugin.gallery_attention:
            raise SearchError(no_maps)
        image = retriever.transform(self.open_picture(path))
        tokenizer = retriever.tokenizer
        ids = tokenize(tokenizer, query, retriever.config["max_text_len"])
        input_ids, attention_mask = pad_token_ids([ids], pad_id_of(tokenizer))
        maps = retriever.plugin.gallery_attention(retriever.model, image[None], input_ids, attention_mask,
                                                  retriever.device)
        if maps is None:
            raise SearchError(no_maps)
        words = tokenizer.convert_ids_to_tokens(ids)
        return [{"label": level["label"], "direction": level["direction"],
                 "grid": list(region_grid(level["weights"].shape[1])), "words": words,
                 "weights": level["weights"].tolist(), "scale_max": float(level["weights"].max())}
                for level in maps[0]]
