"""What the gallery page and the run browser show, on small synthetic inputs (no training):
attention maps on one colour scale per level row with a colour bar, plain scores in
failure cards, square thumbnails; the browser's checkpoint and best-val columns, curves of
a test_only run, integer epoch ticks, and the learning rate of the loop's epoch line."""
import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

GREY = (128, 128, 128)


class FakeSplit:
    """What render_html reads of an ArrowSplit: ``image(index)``."""

    def __init__(self, size=(64, 64)):
        self.size = size

    def image(self, index):
        return Image.new("RGB", self.size, GREY)


def decoded(uri: str) -> Image.Image:
    assert uri.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


class Parts(HTMLParser):
    """Images (src, classes), the text inside elements of each class, <script> ids."""

    def __init__(self, text):
        super().__init__()
        self.images, self.text_of, self.scripts, self.stack, self.level_headers = [], {}, [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "img":
            self.images.append((attrs["src"], classes))
            return
        if tag in ("br", "meta"):
            return
        if tag == "script":
            self.scripts.append(attrs.get("id"))
        if tag == "th" and "level" in classes:
            self.level_headers.append("")
        self.stack.append((tag, classes))

    def handle_endtag(self, tag):
        if tag not in ("img", "br", "meta"):
            self.stack.pop()

    def handle_data(self, data):
        for tag, classes in self.stack:
            for name in classes:
                self.text_of.setdefault(name, []).append(data)
            if tag == "th" and "level" in classes:
                self.level_headers[-1] += data


def query_result(index, gt, score):
    return {"image_index": index, "image_id": str(index), "score": score, "ground_truth": gt, "stage_ranks": {}}


def caption_result(caption, gt, score):
    return {"caption": caption, "image_id": str(caption // 5), "caption_of_image": caption % 5,
            "text": f"caption {caption}", "score": score, "ground_truth": gt, "stage_ranks": {}}


WORDS = ["[CLS]"] + [f"w{i}" for i in range(38)] + ["[SEP]"]  # 40 tokens: well past a screen's width


def gallery_data():
    """One success and one failure each way, one attention pair of 40 tokens on a 2x2 grid:
    a peaked map (0.9), a near-uniform one (0.03 everywhere) and 38 in between."""
    weights = [[0.9, 0.9, 0.9, 0.9], [0.03, 0.03, 0.03, 0.03]] + [
        [0.1 + 0.01 * i, 0.05, 0.02, 0.01] for i in range(len(WORDS) - 2)]
    return {
        "captions": [
            {"caption": 0, "image_id": "0", "caption_of_image": 0, "text": "a red circle", "gt_rank": 1,
             "results": [query_result(0, True, 0.91234), query_result(1, False, 0.5)]},
            {"caption": 5, "image_id": "1", "caption_of_image": 0, "text": "a blue square", "gt_rank": 7,
             "results": [query_result(0, False, 0.8), query_result(2, False, 0.7)]}],
        "images": [
            {"image_index": 0, "image_id": "0", "gt_rank": 1,
             "results": [caption_result(0, True, 0.9), caption_result(5, False, 0.4)]},
            {"image_index": 1, "image_id": "1", "gt_rank": 4,
             "results": [caption_result(0, False, 0.83), caption_result(10, False, 0.6)]}],
        "stages": [],
        "attention": [{"caption": 0, "text": "a red circle", "image_index": 0, "image_id": "0",
                       "ground_truth": True, "words": WORDS,
                       "levels": [{"label": "level 1", "direction": "i2t", "grid": [2, 2], "weights": weights}]}],
    }


def rendered(split=None):
    from hat.gallery import render_html

    data = gallery_data()
    page = render_html(data, split or FakeSplit(), "a test gallery")
    return data, page, Parts(page)


def test_the_maps_of_a_level_share_one_colour_scale_printed_beside_the_row():
    from matplotlib import colormaps

    data, page, parts = rendered()
    heatmaps = [decoded(src) for src, classes in parts.images if "heatmap" in classes]
    assert len(heatmaps) == len(WORDS)  # every token has its map, none cut
    assert parts.level_headers and "scale 0 .. 0.900" in parts.level_headers[0]

    def expected(value):  # the jet colour of value / 0.9 blended 50% over the grey image
        colour = (np.array(colormaps["jet"](value / 0.9)[:3]) * 255).astype(np.uint8)
        return (colour.astype(float) + np.array(GREY)) / 2

    peaked, flat = (np.asarray(image, dtype=float) for image in heatmaps[:2])
    np.testing.assert_allclose(peaked.reshape(-1, 3).mean(0), expected(0.9), atol=2)
    # the near-uniform 0.03 map is drawn as 0.03 of the row's 0.9 (blue), not as its own maximum (red)
    np.testing.assert_allclose(flat.reshape(-1, 3).mean(0), expected(0.03), atol=2)
    assert flat[..., 2].mean() > flat[..., 0].mean() + 40
    # the page's data keep the weights as they were (unscaled)
    embedded = json.loads(re.search(r'id="gallery-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    assert embedded["attention"][0]["levels"][0]["weights"] == data["attention"][0]["levels"][0]["weights"]


def test_one_colour_bar_drawn_in_css_and_the_page_stays_self_contained():
    _, page, parts = rendered()
    assert page.count("linear-gradient(") == 1  # the legend, once, no image
    n_thumbnails = sum(1 for _, classes in parts.images if "heatmap" not in classes)
    assert len(parts.images) == n_thumbnails + len(WORDS) and n_thumbnails == 4 + 2
    assert all(src.startswith("data:image/") for src, _ in parts.images)
    assert parts.scripts == ["gallery-data"]  # the JSON only: no script runs
    assert "http://" not in page and "https://" not in page and "url(" not in page
    legend = "".join(parts.text_of["legend"])
    assert "0" in legend and "max" in legend


def test_failure_cards_style_only_the_rank_as_a_warning():
    _, page, parts = rendered()
    warnings = [text.strip() for text in parts.text_of["rank"] if text.strip()]
    assert warnings and all("rank" in text and "score" not in text for text in warnings), warnings
    scores = "".join(parts.text_of["score"])
    for score in ("0.9123", "0.5000", "0.8000", "0.7000", "0.9000", "0.4000", "0.8300", "0.6000"):
        assert f"score {score}" in scores  # every score is in a plain element
    style = page.split("<style>")[1].split("</style>")[0]
    assert ".failure .rank" in style and ".failure .score" not in style


def test_thumbnails_fill_their_square_frame():
    from hat.gallery import _thumbnail

    class Photo:  # a 500 x 375 landscape photo: blue with a red centre square
        def image(self, index):
            image = Image.new("RGB", (500, 375), (0, 0, 255))
            image.paste((255, 0, 0), (150, 100, 350, 275))
            return image

    thumbnail = decoded(_thumbnail(Photo(), 0))
    assert thumbnail.size == (128, 128)  # its centre square, no band
    pixels = np.asarray(thumbnail, dtype=int)
    assert pixels[64, 64, 0] > 200 and pixels[2, 64, 2] > 200  # centre red, top edge the photo's blue
    small = decoded(_thumbnail(FakeSplit((64, 48)), 0))
    assert small.size == (48, 48)  # small images are not enlarged (the page scales them)
    _, page, _ = rendered(Photo())
    style = page.split("<style>")[1].split("</style>")[0]
    assert "object-fit: contain" not in style and style.count("object-fit: cover") == 2


# -- the run browser ---------------------------------------------------------------

RUN = {"status": "COMPLETED", "start_time": "2024-05-01T10:00:00", "stop_time": "2024-05-01T10:10:00",
       "meta": {"named_configs": ["demo"]}, "result": {"rsum": 300.0}}


def write_run(runs, run_id, config=None, metrics=None, info=None, files=()):
    folder = runs / str(run_id)
    folder.mkdir(parents=True)
    contents = {"run.json": RUN, "config.json": config or {"model": "hat", "dataset": "demo"},
                "metrics.json": metrics if metrics is not None else {
                    "val.rsum": {"steps": [0, 1], "values": [50.0, 70.5]}},
                "info.json": info if info is not None else {"checkpoint": str(folder / "best.ckpt")}}
    for name, content in contents.items():
        (folder / name).write_text(json.dumps(content))
    for name in files:
        (folder / name).write_bytes(b"")
    return folder


def listing(capsys, runs):
    from hat.runs import main

    assert main(["--dir", str(runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out[0].index("checkpoint")  # the last column
    return out[0], {line.split()[0]: line for line in out[1:]}, {line.split()[0]: line[start:] for line in out[1:]}


def test_the_checkpoint_column_shows_the_file_that_exists(tmp_path, capsys):
    runs, elsewhere = tmp_path / "runs", tmp_path / "ckpts" / "hat_1"
    write_run(runs, 1, files=["best.ckpt", "last.ckpt"])
    write_run(runs, 2, files=["last.ckpt"])  # stopped before its first validation
    write_run(runs, 3)  # no checkpoint left
    elsewhere.mkdir(parents=True)
    (elsewhere / "last.ckpt").write_bytes(b"")
    write_run(runs, 4, info={"checkpoint": str(elsewhere / "best.ckpt")})  # checkpoint_dir elsewhere
    write_run(runs, 5, info={"checkpoint": str(runs / "1" / "best.ckpt")})  # a test_only run of run 1's
    write_run(runs, 6, info={"checkpoint": str(runs / "1" / "gone.ckpt")})
    _, _, checkpoints = listing(capsys, runs)
    assert {run_id: text.strip() for run_id, text in checkpoints.items()} == {
        "1": str(runs / "1" / "best.ckpt"), "2": str(runs / "2" / "last.ckpt"), "3": "-",
        "4": str(elsewhere / "last.ckpt"), "5": str(runs / "1" / "best.ckpt"), "6": "-"}


def test_best_val_names_its_metric(tmp_path, capsys):
    hat = {"model": "hat", "dataset": "demo", "select_metric": ["i2t_r1", "t2i_r1"]}
    hat_metrics = {"val.i2t_r1": {"steps": [0, 1], "values": [40.0, 44.1]},
                   "val.t2i_r1": {"steps": [0, 1], "values": [30.0, 40.1]},
                   "val.rsum": {"steps": [0, 1], "values": [300.0, 380.0]}}
    write_run(tmp_path / "hat", 1, config=hat, metrics=hat_metrics)
    header, lines, _ = listing(capsys, tmp_path / "hat")
    assert "best val (r1 sum)" in header and " 84.20 " in lines["1"]

    runs = tmp_path / "mixed"
    write_run(runs, 1, config=hat, metrics=hat_metrics)
    write_run(runs, 2, config={"model": "multisea", "dataset": "demo", "select_metric": ["rsum"]},
              metrics={"val.rsum": {"steps": [0], "values": [386.5]}})
    write_run(runs, 3, metrics={})  # no validation: "-"
    header, lines, _ = listing(capsys, runs)
    assert " r1 sum 84.20 " in lines["1"] and " rsum 386.50 " in lines["2"]
    assert "best val" in header and "(r1 sum)" not in header
    assert lines["3"].split()[8] == "-"  # id, status, model, dataset, named, start (2), duration, best val


def test_curves_of_a_test_only_run_is_one_line(tmp_path, capsys):
    from hat.runs import main

    runs = tmp_path / "runs"
    folder = write_run(runs, 3, metrics={"test.rsum": {"steps": [0], "values": [300.0]},
                                         "test.i2t_r1": {"steps": [0], "values": [50.0]}})
    assert main(["--dir", str(runs), "curves", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["error: run 3 has no training metrics (a test_only run?): nothing to draw"]
    assert not (folder / "curves.png").exists()


def test_one_epoch_curves_have_integer_epoch_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from hat.curves import plot_curves

    drawn, save = [], Figure.savefig

    def keep(figure, *args, **kwargs):
        drawn.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    metrics = {"train.loss": ([0], [2.5]), "train.lr": ([0], [1e-4]), "val.i2t_r1": ([0], [20.0]),
               "val.t2i_r1": ([0], [10.0]), "val.rsum": ([0], [150.0]), "train.step_loss": ([1, 2, 3], [3, 2, 1])}
    plot_curves(metrics, str(tmp_path / "curves.png"))
    axes = [ax for ax in drawn[0].axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in axes] == ["epoch", "optimizer step", "epoch", "epoch"]
    for ax in axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


# -- the loop's epoch line ---------------------------------------------------------

class Sampler:
    batch_size = 2

    def set_epoch(self, epoch, start):
        pass


class Loader:
    batch_sampler = Sampler()

    def __iter__(self):
        return iter([{"x": torch.ones(2, 1)} for _ in range(4)])

    def __len__(self):
        return 4


class Data:
    split = [0] * 8

    def __len__(self):
        return 8


class OneWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([0.1]))


class Plugin:
    name, training_unit = "fake", "pairs"

    def __init__(self, unit):
        self.unit = unit

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=1e-3)

    def scheduler(self, optimizer, steps_per_epoch):
        if self.unit == "step":  # a linear warm-up from 0 over the 8 steps
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 4), "step"
        return torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5), "epoch"

    def start_epoch(self, model, epoch):
        pass

    def loss(self, network, model, micro, epoch, gather):
        return {"loss": (model.weight ** 2).sum() + micro["x"].sum() * 0}


@pytest.mark.parametrize("unit, expected", [
    ("step", (["lr 0.00e+00..7.50e-04", "lr 1.00e-03..1.75e-03"], [0.0, 1e-3])),
    ("epoch", (["lr 1.00e-03", "lr 5.00e-04"], [1e-3, 5e-4]))])
def test_the_epoch_line_prints_the_learning_rates_its_steps_used(unit, expected, tmp_path, capsys):
    from hat.loop import LoopSettings, StopSignals, fit

    logged = {}
    fit(Plugin(unit), OneWeight(), Data(), Loader(), torch.device("cpu"),
        LoopSettings(max_epoch=2, micro_batch_size=2, progress=False), str(tmp_path), StopSignals(),
        lambda: {"i2t_r1": 1.0, "t2i_r1": 2.0, "rsum": 3.0},
        lambda name, value, step: logged.setdefault(name, []).append(value), {}, {})
    lines = [line for line in capsys.readouterr().out.splitlines() if ": loss " in line]
    assert [re.search(r" (lr \S+) ", line).group(1) for line in lines] == expected[0]
    assert logged["train.lr"] == pytest.approx(expected[1])  # the logged scalar as before: the epoch's first step's
