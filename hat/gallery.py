"""What a model retrieves, for people and for scripts: ``gallery.html`` and ``retrievals.json``.

After a test evaluation (and ``python run.py gallery with checkpoint=...``) the runner
passes the score matrices the evaluation ranked (`hat.plugins.Evaluation.scores`, kept
with ``EvalOptions.keep_scores``) to `write_gallery`, which writes into the run's folder:

* ``retrievals.json``: for every query of the split, the top ``json_k`` (10) results with
  their scores, in both directions: ``i2t`` keyed by the arrow files' ``image_id``, ``t2i``
  by the caption index (the caption's position in the split's caption list: column j of
  the score matrix), each with the 1-based rank of its ground truth (the recall
  protocol's rank: ties never favour the ground truth).
* ``gallery.html``: one self-contained page (thumbnails, square centre crops, embedded
  as data URIs, no script, no network) with ``n_queries`` sample captions and their
  top-5 images, ``n_queries`` sample images and their top-5 captions (ground truth
  marked, its rank given when it is not in the top 5), chosen with ``seed`` and about
  half of them failures (ground truth not first) where the split has that many. Models
  add their own views through the plug-in: HAT draws the word-region attention of every
  level for a few (caption, top image) pairs (`hat.plugins.ModelPlugin.gallery_attention`),
  one map per token, the maps of a level on one colour scale from 0 to the row's largest
  weight (printed beside the row; one CSS colour bar on the page); Multi-SEA shows each
  result's rank under its first stage (ITC) next to the re-ranked one
  (``ModelPlugin.stage_labels``). The page ends with its data as JSON
  (``<script type="application/json" id="gallery-data">``), attention weights included
  (unscaled; each level also holds ``scale_max``, the top of its row's colour scale).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os

import numpy as np
import torch

from datamodules.atomic import atomic_file
from hat.evaluation import retrieval_ranks

THUMBNAIL_PX = 128  # longest side of a result thumbnail
HEATMAP_PX = 96  # side of an attention map
SHOWN = 5  # results per query on the page
JSON_K = 10  # results per query in retrievals.json
SORT_ROWS = 1024  # queries sorted at a time (bounds the memory of ranking)


def top_results(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of every row of ``scores`` [Q, N], best first, ties in column
    order (a stable sort) -> (indices [Q, k], scores [Q, k])."""
    k = min(k, scores.shape[1])
    indices, values = [], []
    for start in range(0, scores.shape[0], SORT_ROWS):
        rows = scores[start:start + SORT_ROWS].float().cpu()
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
        indices.append(order)
        values.append(rows.gather(1, order))
    if not indices:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(indices), torch.cat(values)


def sample_queries(gt_ranks: torch.Tensor, n: int, seed: int) -> list[int]:
    """``n`` query indices (sorted) chosen with ``seed``: failures (rank > 0, 0-based) up
    to half of them, successes for the rest; more failures when successes run out."""
    rng = np.random.default_rng(seed)
    ranks = gt_ranks.cpu().numpy()
    failures, successes = np.flatnonzero(ranks > 0), np.flatnonzero(ranks == 0)
    n = min(n, len(ranks))
    n_failures = min(len(failures), (n + 1) // 2)
    n_successes = min(len(successes), n - n_failures)
    n_failures = min(len(failures), n - n_successes)
    chosen = list(rng.choice(failures, n_failures, replace=False)) + list(
        rng.choice(successes, n_successes, replace=False))
    return sorted(int(i) for i in chosen)


def _data_uri(image, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _thumbnail(split, index: int) -> str:
    """A square thumbnail of image ``index``: its centre square (the longer side cropped),
    at most THUMBNAIL_PX a side (a smaller image keeps its size; the page scales it), so
    it fills its square frame on the page with no bands."""
    image = split.image(index).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return _data_uri(image)


COLORMAP = "jet"  # of the attention maps and of the page's colour bar


def heatmap(view, weights: np.ndarray, grid: tuple[int, int], colormap: str = COLORMAP,
            scale_max: float | None = None) -> str:
    """A data URI of ``view`` (a PIL image: what the model saw) with ``weights`` (one per
    region, row-major over ``grid``) drawn over it: scaled from 0 to ``scale_max`` (the
    top of the colour scale; None: the weights' own maximum), coloured with a matplotlib
    colour map, resized with pillow and blended at 50%."""
    from matplotlib import colormaps
    from PIL import Image

    values = np.asarray(weights, dtype=np.float64).reshape(grid)
    peak = values.max() if scale_max is None else float(scale_max)
    scaled = np.clip(values / peak, 0.0, 1.0) if peak > 0 else values
    colours = (colormaps[colormap](scaled)[..., :3] * 255).astype(np.uint8)  # [h, w, 3]
    overlay = Image.fromarray(colours).resize((HEATMAP_PX, HEATMAP_PX), Image.Resampling.BILINEAR)
    base = view.convert("RGB").resize((HEATMAP_PX, HEATMAP_PX), Image.Resampling.BILINEAR)
    return _data_uri(Image.blend(base, overlay, 0.5), "PNG")


def region_grid(regions: int) -> tuple[int, int]:
    """The (rows, columns) of a square token grid of ``regions`` tokens (1 x R otherwise)."""
    side = math.isqrt(regions)
    return (side, side) if side * side == regions else (1, regions)


class SplitView:
    """What the gallery needs of an evaluated split (a `hat.evaluation.EvalData` over the
    datamodules' SplitImages / SplitCaptions): image ids, caption texts, tokens, images."""

    def __init__(self, data):
        self.images_set, self.captions_set = data.images.dataset, data.captions.dataset
        self.split = self.images_set.split
        self.caption_to_image = data.caption_to_image.cpu()
        self.image_ids = [str(self.split.image_id(i)) for i in range(len(self.split))]
        self.pairs = self.captions_set.pairs  # caption j -> (image, k-th caption of that image)

    def text(self, caption: int) -> str:
        image, k = self.pairs[caption]
        return self.split.captions(image)[k]

    def caption_entry(self, caption: int) -> dict:
        image, k = self.pairs[caption]
        return {"caption": caption, "image_id": self.image_ids[image], "caption_of_image": k}


def _keys(image_ids: list[str]) -> list[str]:
    """retrievals.json keys of the images: the image_id, made unique where ids repeat."""
    seen, keys = {}, []
    for index, image_id in enumerate(image_ids):
        keys.append(image_id if image_id not in seen else f"{image_id}#{index}")
        seen[image_id] = index
    return keys


class Ranked:
    """Every query of the split ranked once, both directions: the ground truth's 0-based
    rank (the recall protocol's) and the top ``k`` results with their scores. The page's
    top 5 are the first 5 of these (the sort is stable)."""

    def __init__(self, view: SplitView, i2t: torch.Tensor, t2i: torch.Tensor, k: int = JSON_K):
        self.k = k
        self.i2t_ranks = retrieval_ranks(i2t, view.caption_to_image)[0].cpu()  # [N_images]
        self.t2i_ranks = retrieval_ranks(t2i, view.caption_to_image)[1].cpu()  # [N_captions]
        self.image_top, self.image_scores = top_results(i2t, k)  # [N_images, k] captions
        self.caption_top, self.caption_scores = top_results(t2i.t(), k)  # [N_captions, k] images


def retrievals(view: SplitView, ranked: Ranked) -> dict:
    """The content of retrievals.json (see the module docstring)."""
    k, i2t_ranks, t2i_ranks = ranked.k, ranked.i2t_ranks, ranked.t2i_ranks
    image_top, image_scores = ranked.image_top, ranked.image_scores
    caption_top, caption_scores = ranked.caption_top, ranked.caption_scores
    keys = _keys(view.image_ids)
    ground_truth = [[] for _ in keys]
    for caption, image in enumerate(view.caption_to_image.tolist()):
        ground_truth[image].append(caption)
    images = {}
    for image, key in enumerate(keys):
        images[key] = {"image_index": image, "ground_truth": ground_truth[image],
                       "gt_rank": int(i2t_ranks[image]) + 1,
                       "top": [{**view.caption_entry(int(c)), "score": float(s)}
                               for c, s in zip(image_top[image], image_scores[image])]}
    captions = {}
    for caption in range(len(view.pairs)):
        captions[str(caption)] = {**view.caption_entry(caption), "text": view.text(caption),
                                  "gt_rank": int(t2i_ranks[caption]) + 1,
                                  "top": [{"image_id": view.image_ids[int(i)], "image_index": int(i),
                                           "score": float(s)}
                                          for i, s in zip(caption_top[caption], caption_scores[caption])]}
    return {"k": k, "n_images": len(keys), "n_captions": len(captions), "i2t": images, "t2i": captions}


def _stage_ranks(matrix: torch.Tensor, rows: list[int], axis: str) -> dict:
    """1-based rank of every candidate of the given query rows under another stage's
    matrix (``axis`` "i2t": rows are images; "t2i": rows are captions)."""
    scores = matrix if axis == "i2t" else matrix.t()
    ranks = {}
    for row in rows:
        order = torch.sort(scores[row].float().cpu(), descending=True, stable=True).indices
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        ranks[row] = (position + 1).tolist()
    return ranks


def gallery_data(plugin, model, view: SplitView, ranked: Ranked, scores: dict, device, n_queries: int = 20,
                 seed: int = 0, n_attention: int = 3) -> dict:
    """Everything the page shows (no HTML, no images): the sampled queries with their top
    results, other stages' ranks, and the attention maps of the model's plug-in."""
    i2t_ranks, t2i_ranks = ranked.i2t_ranks, ranked.t2i_ranks
    stages = {label: scores[key] for key, label in plugin.stage_labels.items() if key in scores}
    caption_queries = sample_queries(t2i_ranks, n_queries, seed)
    image_queries = sample_queries(i2t_ranks, n_queries, seed + 1)
    caption_top = ranked.caption_top[caption_queries, :SHOWN]
    caption_scores = ranked.caption_scores[caption_queries, :SHOWN]
    image_top, image_scores = ranked.image_top[image_queries, :SHOWN], ranked.image_scores[image_queries, :SHOWN]
    stage_ranks = {label: (_stage_ranks(m, caption_queries, "t2i"), _stage_ranks(m, image_queries, "i2t"))
                   for label, m in stages.items()}

    captions = []
    for row, caption in enumerate(caption_queries):
        results = []
        for image, score in zip(caption_top[row].tolist(), caption_scores[row].tolist()):
            results.append({"image_index": image, "image_id": view.image_ids[image], "score": score,
                            "ground_truth": image == int(view.caption_to_image[caption]),
                            "stage_ranks": {label: ranks[0][caption][image]
                                            for label, ranks in stage_ranks.items()}})
        captions.append({**view.caption_entry(caption), "text": view.text(caption),
                         "gt_rank": int(t2i_ranks[caption]) + 1, "results": results})
    images = []
    for row, image in enumerate(image_queries):
        results = []
        for caption, score in zip(image_top[row].tolist(), image_scores[row].tolist()):
            results.append({**view.caption_entry(caption), "text": view.text(caption), "score": score,
                            "ground_truth": int(view.caption_to_image[caption]) == image,
                            "stage_ranks": {label: ranks[1][image][caption]
                                            for label, ranks in stage_ranks.items()}})
        images.append({"image_index": image, "image_id": view.image_ids[image],
                       "gt_rank": int(i2t_ranks[image]) + 1, "results": results})
    return {"captions": captions, "images": images, "stages": list(stages),
            "attention": attention_pairs(plugin, model, view, captions, device, n_attention)}


def attention_pairs(plugin, model, view: SplitView, captions: list[dict], device, n_pairs: int) -> list[dict]:
    """The plug-in's attention maps for up to ``n_pairs`` (caption, its top image) pairs of
    the sampled captions: successes first, then a failure (when there is one)."""
    successes = [q for q in captions if q["gt_rank"] == 1]
    failures = [q for q in captions if q["gt_rank"] > 1]
    chosen = successes[:max(n_pairs - 1, 0)] + failures[:1]
    chosen += [q for q in captions if q not in chosen][:n_pairs - len(chosen)]
    if not chosen:
        return []
    from datamodules.datasets import pad_id_of, pad_token_ids

    images = torch.stack([view.images_set[q["results"][0]["image_index"]] for q in chosen])
    tokens = [view.captions_set[q["caption"]] for q in chosen]
    input_ids, attention_mask = pad_token_ids(tokens, pad_id_of(view.captions_set.tokenizer))
    maps = plugin.gallery_attention(model, images, input_ids, attention_mask, device)
    if maps is None:
        return []
    pairs = []
    for query, ids, levels in zip(chosen, tokens, maps):
        top = query["results"][0]
        pairs.append({"caption": query["caption"], "text": query["text"], "image_index": top["image_index"],
                      "image_id": top["image_id"], "ground_truth": top["ground_truth"],
                      "words": view.captions_set.tokenizer.convert_ids_to_tokens(ids),
                      "levels": [{"label": level["label"], "direction": level["direction"],
                                  "grid": list(region_grid(level["weights"].shape[1])),
                                  "weights": level["weights"].tolist(),
                                  "scale_max": float(level["weights"].max())} for level in levels]})
    return pairs


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; max-width: 1240px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
.meta { color: #555; font-size: 13px; }
.query { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.query.failure { border-color: #d9822b; }
.caption { font-size: 15px; margin: 4px 0 8px; }
.rank { font-size: 13px; color: #555; }
.failure .rank { color: #b35c00; font-weight: bold; }
.score { font-size: 12px; color: #555; font-weight: normal; }
ol.results { display: flex; flex-wrap: wrap; gap: 10px; list-style: none; padding: 0; margin: 0; }
ol.results li { width: 140px; font-size: 12px; text-align: center; }
ol.results.captions li { width: 220px; text-align: left; border-left: 3px solid #eee; padding-left: 6px; }
ol.results img { width: 128px; height: 128px; object-fit: cover; border: 3px solid transparent; }
li.gt img { border-color: #2a9d3a; } li.gt { font-weight: bold; }
ol.results.captions li.gt { border-left-color: #2a9d3a; }
.badge { color: #2a9d3a; }
.query-image img { width: 128px; height: 128px; object-fit: cover; float: left; margin-right: 12px; }
.query-image::after { content: ""; display: block; clear: both; }
table.attention { border-collapse: collapse; margin: 8px 0 24px; }
table.attention td, table.attention th { padding: 2px; font-size: 11px; text-align: center; vertical-align: top; }
table.attention th.level, table.attention th.corner { text-align: left; width: 120px; min-width: 120px;
  position: sticky; left: 0; background: #fff; z-index: 1; }
table.attention .scale { font-weight: normal; color: #555; white-space: nowrap; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: #555; margin: 4px 0 12px; }
.legend .colorbar { display: inline-block; width: 240px; height: 12px; border: 1px solid #999; }
table.attention img { width: 96px; height: 96px; display: block; }
.scroll { overflow-x: auto; }
"""


def colorbar_css(colormap: str = COLORMAP, stops: int = 17) -> str:
    """A CSS linear-gradient (left: 0, right: the top of the scale) of ``colormap``, the
    maps' colours before they are blended over the image."""
    from matplotlib import colormaps

    colours = colormaps[colormap](np.linspace(0.0, 1.0, stops))[:, :3]
    parts = [f"rgb({r}, {g}, {b}) {100 * i / (stops - 1):g}%" for i, (r, g, b) in
             enumerate(np.rint(colours * 255).astype(int).tolist())]
    return f"linear-gradient(to right, {', '.join(parts)})"


def _scale_max(level: dict) -> float:
    """The top of a level row's colour scale: the largest weight of the row."""
    if "scale_max" in level:
        return float(level["scale_max"])
    return max((max(weights) for weights in level["weights"] if weights), default=0.0)


def _score_text(result: dict) -> str:
    text = f"score {result['score']:.4f}"
    for label, rank in result["stage_ranks"].items():
        text += f" · {html.escape(label)} rank {rank}"
    return text


def _caption_queries(queries: list, thumb) -> list[str]:
    """The caption queries, each with its top-5 images."""
    out = ["<h2 id=\"text-to-image\">Caption → top-5 images</h2>"]
    for query in queries:
        failure = query["gt_rank"] > 1
        out.append(f"<div class=\"query caption-query{' failure' if failure else ''}\" "
                   f"data-caption=\"{query['caption']}\" data-gt-rank=\"{query['gt_rank']}\">")
        out.append(f"<p class=\"caption\">“{html.escape(query['text'])}” "
                   f"<span class=\"rank\">ground truth at rank {query['gt_rank']}</span></p><ol class=\"results\">")
        for position, result in enumerate(query["results"], start=1):
            gt = result["ground_truth"]
            image_id = html.escape(result["image_id"])
            out.append(f"<li class=\"{'gt' if gt else 'other'}\" data-image-id=\"{image_id}\" "
                       f"data-image-index=\"{result['image_index']}\"><img alt=\"image {image_id}\" "
                       f"src=\"{thumb(result['image_index'])}\"><br>{position}. "
                       f"<span class=\"score\">{_score_text(result)}</span>"
                       f"{' <span class=badge>✔ ground truth</span>' if gt else ''}</li>")
        out.append("</ol></div>")
    return out


def _image_queries(queries: list, thumb) -> list[str]:
    """The image queries, each with its top-5 captions."""
    out = ["<h2 id=\"image-to-text\">Image → top-5 captions</h2>"]
    for query in queries:
        failure = query["gt_rank"] > 1
        out.append(f"<div class=\"query image-query{' failure' if failure else ''}\" "
                   f"data-image-id=\"{html.escape(query['image_id'])}\" data-image-index=\"{query['image_index']}\" "
                   f"data-gt-rank=\"{query['gt_rank']}\"><div class=\"query-image\">"
                   f"<img alt=\"query image {html.escape(query['image_id'])}\" src=\"{thumb(query['image_index'])}\">"
                   f"<p class=\"rank\">{html.escape(query['image_id'])}: first ground-truth caption at rank "
                   f"{query['gt_rank']}</p></div><ol class=\"results captions\">")
        for position, result in enumerate(query["results"], start=1):
            gt = result["ground_truth"]
            out.append(f"<li class=\"{'gt' if gt else 'other'}\" data-caption=\"{result['caption']}\">{position}. "
                       f"{html.escape(result['text'])}<br><span class=\"score\">{_score_text(result)}</span>"
                       f"{' <span class=badge>✔ ground truth</span>' if gt else ''}</li>")
        out.append("</ol></div>")
    return out


def attention_legend() -> str:
    """The colour bar of the attention maps' scale (0 .. a row's largest weight)."""
    return (f"<div class=\"legend\"><span>colour scale: 0</span><span class=\"colorbar\" "
            f"style=\"background: {colorbar_css()}\"></span><span>the row's max (blended 50% over "
            f"the image)</span></div>")


def attention_table(view, words: list[str], levels: list[dict]) -> list[str]:
    """The HTML of one (caption, image) pair's maps: a ``<table class="attention">`` with a
    header row of ``words`` (the caption's tokens) and one row per level of ``levels``
    ({"label", "direction", "grid", "weights": [n_words][regions], "scale_max"}: what
    `attention_pairs` and ``hat.search.SearchIndex.attention`` return), one `heatmap` per
    word over ``view`` (the image as the model saw it), on the row's colour scale; the
    gallery's STYLE lays it out. Shared by the gallery and the search server's attention page."""
    out = ["<table class=\"attention\"><tr><th class=\"corner\"></th>"]
    out.extend(f"<th>{html.escape(word)}</th>" for word in words)
    out.append("</tr>")
    for level in levels:
        scale = _scale_max(level)
        out.append(f"<tr><th class=\"level\" data-scale-max=\"{scale!r}\">{html.escape(level['label'])} "
                   f"({level['direction']}, {level['grid'][0]}×{level['grid'][1]} regions)<br>"
                   f"<span class=\"scale\">scale 0 .. {scale:.3f}</span></th>")
        for weights in level["weights"]:
            source = heatmap(view, np.asarray(weights), tuple(level["grid"]), scale_max=scale)
            out.append(f"<td><img class=\"heatmap\" alt=\"attention map\" src=\"{source}\">"
                       f"max {max(weights):.3f}</td>")
        out.append("</tr>")
    out.append("</table>")
    return out


def _attention_section(pairs: list, split, view_transform) -> list[str]:
    """The word-region attention maps of a few (caption, top image) pairs, a row per level."""
    out = ["<h2 id=\"attention\">Word-region attention per level</h2>"]
    out.append("<p class=\"meta\">Each map is one word's SCAN attention weights over the image's regions "
               "(its largest weight printed under it), on the image as the model saw it; every token of "
               "the caption has its map (long rows scroll sideways). The maps of a level share one colour "
               "scale, from 0 to the largest weight of the row, printed beside it (\u201cscale 0 .. "
               "max\u201d): a flat map stays blue beside a peaked one. i2t: the share of each region's "
               "attention that goes to the word; t2i: the word's attention over the regions.</p>")
    out.append(attention_legend())
    for pair in pairs:
        view = split.image(pair["image_index"])
        if view_transform is not None:
            view = view_transform(view)
        verdict = "the ground truth" if pair["ground_truth"] else "not the ground truth"
        table = attention_table(view, pair["words"], pair["levels"])
        out.append(f"<div class=\"attention-pair\" data-caption=\"{pair['caption']}\" "
                   f"data-image-id=\"{html.escape(pair['image_id'])}\"><p class=\"caption\">“"
                   f"{html.escape(pair['text'])}” and its top image {html.escape(pair['image_id'])} "
                   f"({verdict}; {len(pair['words'])} tokens, one map each)</p><div class=\"scroll\">"
                   f"{table[0]}")
        out.extend(table[1:-1])
        out.append(f"{table[-1]}</div></div>")
    return out


def render_html(data: dict, split, title: str, metrics: dict | None = None, view_transform=None) -> str:
    """The page of `gallery_data` (thumbnails and heat maps from ``split``, an ArrowSplit)."""
    thumbnails = {}

    def thumb(index: int) -> str:
        if index not in thumbnails:
            thumbnails[index] = _thumbnail(split, index)
        return thumbnails[index]

    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    if metrics:
        shown = ", ".join(f"{key} {metrics[key]:.2f}" for key in
                          ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum") if key in metrics)
        out.append(f"<p class=\"meta\">{shown}</p>")
    stages = "".join(f"; {html.escape(s)} rank: that result's rank under {html.escape(s)} alone"
                     for s in data["stages"])
    out.append(f"<p class=\"meta\">Results in ranked order with their scores; green: ground truth. Queries "
               f"were drawn at random (seeded), about half of them failures (ground truth not first){stages}.</p>")

    out.extend(_caption_queries(data["captions"], thumb))
    out.extend(_image_queries(data["images"], thumb))
    if data["attention"]:
        out.extend(_attention_section(data["attention"], split, view_transform))
    payload = json.dumps(data).replace("</", "<\\/")
    out.append(f"<script type=\"application/json\" id=\"gallery-data\">{payload}</script>")
    out.append("</body></html>")
    return "\n".join(out)


def write_gallery(out_dir: str, plugin, model, data, scores: dict, device, title: str, metrics: dict | None = None,
                  n_queries: int = 20, seed: int = 0, view_transform=None) -> dict:
    """Write gallery.html and retrievals.json into ``out_dir`` (each atomically) ->
    {"gallery": path, "retrievals": path}."""
    view = SplitView(data)
    ranked = Ranked(view, scores["i2t"], scores["t2i"])
    content = {"title": title, **retrievals(view, ranked)}
    page = render_html(gallery_data(plugin, model, view, ranked, scores, device, n_queries, seed),
                       view.split, title, metrics, view_transform)
    paths = {"gallery": os.path.join(out_dir, "gallery.html"),
             "retrievals": os.path.join(out_dir, "retrievals.json")}
    with atomic_file(paths["retrievals"], "w") as handle:
        json.dump(content, handle)
    with atomic_file(paths["gallery"], "w") as handle:
        handle.write(page)
    return paths
