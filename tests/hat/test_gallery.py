"""gallery.html, retrievals.json, curves.png and TensorBoard events of real tiny demo runs,
checked against score matrices and SCAN weights recomputed here."""
import functools
import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import hat
from tests.conftest import ROOT, run_folder
from tests.hat.conftest import runner_scores

N_QUERIES = 20  # the default


class Page(HTMLParser):
    """The parts of gallery.html the tests read: queries with their listed results (in
    page order, with their classes), the embedded images and the JSON data."""

    def __init__(self, text: str):
        super().__init__()
        self.captions, self.images, self.sources, self.heatmaps, self.pairs = [], [], [], 0, []
        self.open_tags, self._query, self._in_data, self.data_text = [], None, False, ""
        self.feed(text)
        self.close()
        self.data = json.loads(self.data_text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag not in ("img", "br", "meta"):
            self.open_tags.append(tag)
        if tag == "div" and "caption-query" in classes:
            self._query = {"caption": int(attrs["data-caption"]), "gt_rank": int(attrs["data-gt-rank"]),
                           "results": [], "failure": "failure" in classes}
            self.captions.append(self._query)
        elif tag == "div" and "image-query" in classes:
            self._query = {"image": int(attrs["data-image-index"]), "gt_rank": int(attrs["data-gt-rank"]),
                           "results": [], "failure": "failure" in classes}
            self.images.append(self._query)
        elif tag == "div" and "attention-pair" in classes:
            self._query = None
            self.pairs.append({"caption": int(attrs["data-caption"]), "rows": 0})
        elif tag == "tr" and self.pairs:
            self.pairs[-1]["rows"] += 1
        elif tag == "li" and self._query is not None:
            key = "data-image-index" if "caption" in self._query else "data-caption"
            self._query["results"].append((int(attrs[key]), "gt" in classes))
        elif tag == "img":
            self.sources.append(attrs["src"])
            self.heatmaps += "heatmap" in classes
        elif tag == "script" and attrs.get("id") == "gallery-data":
            self._in_data = True

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags.pop() == tag, f"</{tag}> closes nothing"
        self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data_text += data


def stable_top(scores, k):
    """Indices of the k highest scores, ties in index order (a literal stable sort)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:k]


def caption_rank(sims, j):
    """1-based rank of caption j's image (j // 5) among all images; ties count against it."""
    column = sims[:, j]
    return 1 + sum(1 for i in range(len(column)) if i != j // 5 and column[i] >= column[j // 5])


def image_rank(sims, i):
    """1-based rank of image i's best caption among the other images' captions."""
    row = sims[i]
    best = max(row[c] for c in range(len(row)) if c // 5 == i)
    return 1 + sum(1 for c in range(len(row)) if c // 5 != i and row[c] >= best)


@functools.lru_cache(maxsize=None)
def recomputed(checkpoint, data_root):
    """The test split's score matrix recomputed through hat.load_model (float64 numpy;
    computed once per checkpoint: the tests only read it)."""
    from datamodules import open_split

    retriever = hat.load_model(checkpoint)
    split = open_split(data_root, "demo", "test")
    images = [split.image(i) for i in range(len(split))]
    captions = [caption for i in range(len(split)) for caption in split.captions(i)[:5]]
    sims = retriever.score(retriever.encode_images(images), retriever.encode_texts(captions))
    return sims.double().numpy(), retriever, split, captions


@pytest.fixture(scope="module", params=["i2t", "t2i"])
def gallery_of_run(request, browse_runs, hat_run):
    """(run folder, checkpoint, data root) of an i2t run (the browser's first run) and of a t2i
    run (the t2i demo run)."""
    if request.param == "i2t":
        runs, trained, _ = browse_runs
        folder = run_folder(trained)
        return folder, str(folder / "best.ckpt"), str(runs.parent / "data")
    run, checkpoint, data_root = hat_run
    return os.path.dirname(checkpoint), checkpoint, data_root


def test_gallery_lists_equal_the_top_5_of_the_test_scores(gallery_of_run):
    folder, checkpoint, data_root = gallery_of_run
    page = Page(open(os.path.join(folder, "gallery.html"), encoding="utf-8").read())
    assert not page.open_tags  # every element closed
    sims, retriever, split, captions = recomputed(checkpoint, data_root)
    n_images, n_captions = sims.shape
    assert (n_images, n_captions) == (12, 60)

    assert len(page.captions) == N_QUERIES and len(page.images) == min(N_QUERIES, n_images)
    for query in page.captions:
        j = query["caption"]
        assert [i for i, _ in query["results"]] == stable_top(sims[:, j], 5)
        assert [gt for _, gt in query["results"]] == [i == j // 5 for i in stable_top(sims[:, j], 5)]
        assert query["gt_rank"] == caption_rank(sims, j)
        assert query["failure"] == (query["gt_rank"] > 1)
    for query in page.images:
        i = query["image"]
        assert [c for c, _ in query["results"]] == stable_top(sims[i], 5)
        assert [gt for _, gt in query["results"]] == [c // 5 == i for c in stable_top(sims[i], 5)]
        assert query["gt_rank"] == image_rank(sims, i)
    # the sample holds failures and successes (the tiny model has both)
    assert {q["failure"] for q in page.captions} == {True, False}
    # failures up to half the sample, more when the split has too few successes to fill it
    ranks = [caption_rank(sims, j) for j in range(n_captions)]
    n_failures, n_successes = sum(r > 1 for r in ranks), sum(r == 1 for r in ranks)
    expected = min(n_failures, max((N_QUERIES + 1) // 2, N_QUERIES - n_successes))
    assert sum(q["failure"] for q in page.captions) == expected

    # embedded images: 5 per caption query, 1 per image query, one map per word and level
    levels = len(retriever.config["level_pairs"])
    words = sum(len(retriever.tokenizer(captions[p["caption"]])["input_ids"]) for p in page.pairs)
    assert len(page.pairs) == 3 and all(p["rows"] == 1 + levels for p in page.pairs)  # a header row each
    assert page.heatmaps == levels * words
    assert len(page.sources) == 5 * len(page.captions) + len(page.images) + levels * words
    assert all(src.startswith("data:image/") for src in page.sources)
    text = open(os.path.join(folder, "gallery.html"), encoding="utf-8").read()
    assert "http://" not in text and "https://" not in text  # nothing to fetch


def test_retrievals_json_ranks_every_query_like_the_score_matrix(gallery_of_run):
    folder, checkpoint, data_root = gallery_of_run
    content = json.load(open(os.path.join(folder, "retrievals.json")))
    sims, _, split, captions = recomputed(checkpoint, data_root)
    assert content["k"] == 10
    assert list(content["i2t"]) == [split.image_id(i) for i in range(len(split))]
    for i, (image_id, entry) in enumerate(content["i2t"].items()):
        assert entry["image_index"] == i and entry["gt_rank"] == image_rank(sims, i)
        assert [hit["caption"] for hit in entry["top"]] == stable_top(sims[i], 10)
        assert [hit["image_id"] for hit in entry["top"]] == [split.image_id(c // 5) for c in stable_top(sims[i], 10)]
        assert [hit["score"] for hit in entry["top"]] == pytest.approx(sorted(sims[i], reverse=True)[:10], abs=1e-6)
    assert list(content["t2i"]) == [str(j) for j in range(len(captions))]
    for j, entry in enumerate(content["t2i"].values()):
        assert entry["text"] == captions[j] and entry["image_id"] == split.image_id(j // 5)
        assert entry["caption_of_image"] == j % 5 and entry["gt_rank"] == caption_rank(sims, j)
        assert [hit["image_index"] for hit in entry["top"]] == stable_top(sims[:, j], 10)
        assert [hit["score"] for hit in entry["top"]] == pytest.approx(sorted(sims[:, j], reverse=True)[:10],
                                                                       abs=1e-6)


def literal_scan_weights(image_tokens, caption_tokens, direction, lam):
    """The SCAN attention weights of one pair, element by element (float64): a [n][R]
    table, entry (w, r) = a_rw (i2t) or a_wr (t2i)."""
    v = image_tokens.double().tolist()
    t = caption_tokens.double().tolist()
    n, regions = len(t), len(v)

    def leaky(x):
        return x if x > 0 else 0.1 * x

    s = [[leaky(sum(a * b for a, b in zip(t[w], v[r]))) for r in range(regions)] for w in range(n)]
    weights = [[0.0] * regions for _ in range(n)]
    if direction == "i2t":
        # normalise each word over the regions; softmax over the words for each region
        norms = [math.sqrt(sum(s[w][r] ** 2 for r in range(regions))) for w in range(n)]
        for r in range(regions):
            logits = [lam * s[w][r] / (norms[w] + 1e-8) for w in range(n)]
            total = sum(math.exp(x) for x in logits)
            for w in range(n):
                weights[w][r] = math.exp(logits[w]) / total
    else:
        # normalise each region over the words; softmax over the regions for each word
        norms = [math.sqrt(sum(s[w][r] ** 2 for w in range(n))) for r in range(regions)]
        for w in range(n):
            logits = [lam * s[w][r] / (norms[r] + 1e-8) for r in range(regions)]
            total = sum(math.exp(x) for x in logits)
            for r in range(regions):
                weights[w][r] = math.exp(logits[r]) / total
    return np.array(weights)


def test_attention_maps_equal_a_literal_scan_restatement(gallery_of_run):
    folder, checkpoint, data_root = gallery_of_run
    page = Page(open(os.path.join(folder, "gallery.html"), encoding="utf-8").read())
    _, retriever, split, captions = recomputed(checkpoint, data_root)
    model = retriever.model
    pair = page.data["attention"][0]
    assert pair["caption"] == page.pairs[0]["caption"] and pair["text"] == captions[pair["caption"]]
    image = retriever.transform(split.image(pair["image_index"]))[None]
    ids = torch.tensor([retriever.tokenizer(pair["text"])["input_ids"]])
    assert pair["words"] == retriever.tokenizer.convert_ids_to_tokens(ids[0])
    with torch.no_grad():
        image_levels = model.encode_images(image)
        caption_levels = model.encode_captions(ids, torch.ones_like(ids))
    assert len(pair["levels"]) == len(image_levels) == 3
    for level, v, t in zip(pair["levels"], image_levels, caption_levels):
        expected = literal_scan_weights(v[0], t[0], model.direction, model.lambda_softmax)
        assert level["direction"] == model.direction == retriever.config["direction"]
        side = math.isqrt(v.shape[1])
        assert level["grid"] == [side, side] and side * side == v.shape[1]
        # fp32 softmax against the fp64 restatement (weights in [0, 1]; a wrong axis is off by far more)
        np.testing.assert_allclose(np.array(level["weights"]), expected, rtol=1e-4, atol=1e-6)
    # the gallery's pair is the caption with its top image under the test scores
    sims = recomputed(checkpoint, data_root)[0]
    assert pair["image_index"] == stable_top(sims[:, pair["caption"]], 1)[0]


def test_the_gallery_command_writes_the_same_rankings(hat_run, tmp_path):
    from run import ex

    run, checkpoint, data_root = hat_run
    command = ex.run("gallery", config_updates={"checkpoint": checkpoint, "data_root": data_root, "n_queries": 4,
                                                 "observer_dir": None, "gallery_dir": str(tmp_path)})
    assert command.status == "COMPLETED" and command.result == run.result
    assert json.load(open(tmp_path / "retrievals.json")) == json.load(
        open(os.path.join(os.path.dirname(checkpoint), "retrievals.json")))
    page = Page((tmp_path / "gallery.html").read_text(encoding="utf-8"))
    assert len(page.captions) == 4 and len(page.images) == 4
    # the same seed draws the same queries: they are the first ones the run's gallery would draw
    from hat.gallery import sample_queries
    from hat.evaluation import retrieval_ranks

    sims = torch.from_numpy(recomputed(checkpoint, data_root)[0])
    ranks = retrieval_ranks(sims)[1]
    assert [q["caption"] for q in page.captions] == sample_queries(ranks, 4, seed=0)
    assert sum(q["failure"] for q in page.captions) == 2  # half of them, the model has enough of both


def test_multisea_gallery_shows_the_itc_rank_beside_the_reranked_one(multisea_run):
    run, checkpoint, data_root = multisea_run
    folder = os.path.dirname(checkpoint)
    page = Page(open(os.path.join(folder, "gallery.html"), encoding="utf-8").read())
    _, scores, _, _ = runner_scores(checkpoint, data_root)
    itc, t2i, i2t = (scores[key].double().numpy() for key in ("itc", "t2i", "i2t"))
    assert page.data["stages"] == ["ITC"] and page.data["attention"] == [] and not page.heatmaps
    for query, shown in zip(page.data["captions"], page.captions):
        j = query["caption"]
        assert [r["image_index"] for r in query["results"]] == [i for i, _ in shown["results"]]
        assert [r["image_index"] for r in query["results"]] == stable_top(t2i[:, j], 5)  # re-ranked
        itc_order = stable_top(itc[:, j], itc.shape[0])
        assert [r["stage_ranks"]["ITC"] for r in query["results"]] == [
            itc_order.index(r["image_index"]) + 1 for r in query["results"]]
    for query in page.data["images"]:
        i = query["image_index"]
        itc_order = stable_top(itc[i], itc.shape[1])
        assert [r["caption"] for r in query["results"]] == stable_top(i2t[i], 5)
        assert [r["stage_ranks"]["ITC"] for r in query["results"]] == [
            itc_order.index(r["caption"]) + 1 for r in query["results"]]
    html = open(os.path.join(folder, "gallery.html"), encoding="utf-8").read()
    assert html.count("ITC rank") >= 5 * (len(page.captions) + len(page.images))


def test_curves_png_of_a_run_and_of_the_command(hat_run, tmp_path):
    from PIL import Image

    _, checkpoint, _ = hat_run
    folder = os.path.dirname(checkpoint)
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    assert len(metrics["train.step_loss"]["values"]) == 15  # 240 captions / 16 per step, log_every_steps=1
    for path in (os.path.join(folder, "curves.png"), str(tmp_path / "again.png")):
        if path.startswith(str(tmp_path)):
            proc = subprocess.run([sys.executable, "-m", "hat.runs", "curves", folder, "--out", path], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert proc.stdout.strip() == path
        image = Image.open(path)
        assert image.size == (1200, 800)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # lines, text and markers, not a blank canvas
        assert (pixels < 128).all(axis=1).mean() > 0.001  # dark ink (axes, labels, curves)


def test_curves_of_a_folder_without_metrics_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hat.runs", "curves", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'metrics.json'} does not exist")


def test_tensorboard_events_hold_the_logged_scalars(hat_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, checkpoint, _ = hat_run
    folder = os.path.dirname(checkpoint)
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    events = EventAccumulator(os.path.join(folder, "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert sorted(tags) == sorted(name.replace(".", "/") for name in metrics)
    for name, series in metrics.items():
        logged = events.Scalars(name.replace(".", "/"))
        assert [e.step for e in logged] == series["steps"]
        assert [e.value for e in logged] == pytest.approx(series["values"], rel=1e-6)


def test_tensorboard_true_without_a_run_folder_is_one_line(hat_run, tmp_path):
    from run import UsageError, ex

    _, checkpoint, data_root = hat_run
    with pytest.raises(UsageError) as error:
        ex.run(config_updates={"checkpoint": checkpoint, "data_root": data_root, "test_only": True,
                               "observer_dir": None, "tensorboard": True, "gallery_dir": str(tmp_path)})
    assert str(error.value) == ("tensorboard=True writes into the run's folder, and this run has none "
                                "(observer_dir=None): pass tensorboard=DIR")
    assert not os.listdir(tmp_path)  # nothing written
