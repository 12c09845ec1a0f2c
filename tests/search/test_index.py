"""hat.search: an index of a folder of pictures ranks them exactly as Retriever.search does
on the same files (HAT's summed levels, Multi-SEA's ITC + ITM re-rank); incremental
updates and resumed builds give what a fresh build gives; unreadable files are skipped
and remembered; foreign indexes and changed checkpoints are refused."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hat.fingerprint import file_digest
from hat.search import SearchError, SearchIndex, build_index
from tests.search.conftest import copy_pictures


def as_pairs(hits) -> list[list[tuple[int, float]]]:
    return [[(hit.index, hit.score) for hit in one.results] for one in hits]


def files_of(index: SearchIndex) -> list[str]:
    return [index.resolve(path) for path in index.paths]


def assert_same_features(a, b) -> None:
    """Features of the same pixels: equal, up to the last bits of GEMMs over batches of
    other sizes (a picture encoded in a batch of 1 or of 4 can differ in its last bit)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def assert_same_results(a: list, b: list) -> None:
    """The same pictures in the same order, scores equal up to rtol 1e-6."""
    assert [[i for i, _ in hits] for hits in a] == [[i for i, _ in hits] for hits in b]
    for x, y in zip(a, b):
        assert [s for _, s in x] == pytest.approx([s for _, s in y], rel=1e-6, abs=1e-7)


def assert_same_index(a: SearchIndex, b: SearchIndex, queries) -> None:
    """The same pictures, features and query results."""
    assert a.paths == b.paths
    assert_same_features(a.features, b.features)
    assert_same_results(as_pairs(a.search(queries, 10)), as_pairs(b.search(queries, 10)))


@pytest.mark.parametrize("model", ["hat", "multisea"])
def test_query_results_equal_retriever_search_on_the_files(model, demo_indexes, demo_pictures, checkpoints, queries):
    folder = demo_indexes[model]
    index = SearchIndex.open(folder)
    assert len(index) == 200 and index.model_name == model and index.root == str(demo_pictures)
    assert index.paths == sorted(index.paths) and sum(p.startswith("sub/") for p in index.paths) == 67
    assert "demo007.JPG" in index.paths

    hits = index.search(queries, 10)
    reference = index.retriever.search(queries, files_of(index), k=10, rerank=model == "multisea")
    assert as_pairs(hits) == reference  # indices and scores, exactly (the same batches of 16: shards of 64)
    assert all(hit.path == index.paths[hit.index] for one in hits for hit in one.results)
    assert all(one.note is None and len(one.results) == 10 for one in hits)
    assert len({hit.score for hit in hits[0].results}) == 10  # not all tied
    if model == "multisea":  # the re-rank changed the scores: ITC alone ranks otherwise
        itc = index.retriever.search(queries, index.features, k=10, rerank=False)
        assert [[s for _, s in q] for q in itc] != [[s for _, s in q] for q in reference]
    every = index.search(queries, 500)[0].results  # k beyond the index: every picture
    assert len(every) == 200 and every[:10] == hits[0].results

    # the folder: a JSON manifest and safetensors shards, no pickle
    names = sorted(set(os.listdir(folder)) - {"fingerprints.json"})  # (the digest memo: once the file is old enough)
    assert names == [".lock", "manifest.json"] + [f"shard-00000{i}.safetensors" for i in (1, 2, 3, 4)]
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert (manifest["format"], manifest["version"], manifest["model"]) == ("hat-search-index", 1, model)
    assert manifest["checkpoint"]["path"] == os.path.abspath(checkpoints[model])
    assert manifest["checkpoint"]["digest"] == file_digest(checkpoints[model])
    assert manifest["config"] == json.loads(json.dumps({k: v for k, v in index.retriever.config.items()
                                                        if k != "device"}))
    assert manifest["root"] == str(demo_pictures) and manifest["skipped"] == []
    first = manifest["files"][0]
    stat = os.stat(demo_pictures / first["path"])
    assert (first["size"], first["mtime_ns"], first["shard"], first["row"]) == \
        (stat.st_size, stat.st_mtime_ns, "shard-000001.safetensors", 0)
    assert [spec["shape"] for spec in manifest["features"]["tensors"]] == [list(f.shape[1:]) for f in index.features]
    from safetensors.torch import load_file
    shard = load_file(os.path.join(folder, "shard-000004.safetensors"))
    assert shard["f0"].shape[0] == 200 - 3 * 64
    assert torch.equal(shard["f0"], index.features[0][192:])

    again = build_index(checkpoints[model], demo_pictures, out=folder, progress=False)  # nothing changed
    assert (again.encoded, again.reused, again.dropped, again.skipped, again.total) == (0, 200, 0, [], 200)
    assert json.load(open(os.path.join(folder, "manifest.json")))["files"] == manifest["files"]


def change_folder(folder, demo_split, paths):
    """Delete the first 16 pictures (all of shard 1), rewrite 2 with other content and a
    new mtime, add 3 (one in a new subfolder) -> (deleted, changed, added)."""
    deleted, changed = paths[:16], [paths[20], paths[40]]
    for path in deleted:
        os.remove(folder / path)
    for offset, path in enumerate(changed):
        (folder / path).write_bytes(demo_split.image_bytes(180 + offset))
        os.utime(folder / path, ns=(1_000_000_000 * (offset + 1),) * 2)
    added = ["new/a.jpg", "zz.jpg", "b.jpeg"]
    (folder / "new").mkdir()
    for offset, path in enumerate(added):
        (folder / path).write_bytes(demo_split.image_bytes(190 + offset))
    return deleted, changed, added


def test_an_incremental_update_equals_a_fresh_build(tmp_path, demo_pictures, demo_split, checkpoints, queries):
    folder = tmp_path / "pictures"
    paths = copy_pictures(demo_pictures, folder, 60)
    checkpoint = checkpoints["hat"]
    first = build_index(checkpoint, folder, batch_size=8, shard_size=16, progress=False)
    assert first.out == str(folder / ".hat-index")  # the default: inside the folder (hidden, never indexed)
    assert (first.encoded, first.reused, first.total) == (60, 0, 60)
    deleted, changed, added = change_folder(folder, demo_split, paths)

    update = build_index(checkpoint, folder, batch_size=8, shard_size=16, progress=False)
    assert (update.encoded, update.reused, update.dropped, update.total) == (5, 60 - 16 - 2, 16, 47)
    shards = sorted(n for n in os.listdir(update.out) if n.startswith("shard-"))
    assert "shard-000001.safetensors" not in shards and "shard-000005.safetensors" in shards  # emptied: removed
    fresh = build_index(checkpoint, folder, out=tmp_path / "fresh", batch_size=8, shard_size=16, progress=False)
    assert (fresh.encoded, fresh.total) == (47, 47)

    updated, rebuilt = SearchIndex.open(update.out), SearchIndex.open(fresh.out)
    assert set(updated.paths) == (set(paths) - set(deleted)) | set(added)
    assert_same_index(updated, rebuilt, queries)
    reference = updated.retriever.search(queries, files_of(updated), k=10)
    assert_same_results(as_pairs(updated.search(queries, 10)), reference)


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch, demo_pictures, checkpoints, queries):
    """An update of 16 indexed pictures with 24 new ones, killed after its first new shard
    (8 pictures): the old index still opens; the next run encodes the other 16 only."""
    from hat.models.multisea.plugin import MultiSEAPlugin

    folder, checkpoint = tmp_path / "pictures", checkpoints["multisea"]
    paths = copy_pictures(demo_pictures, tmp_path / "all", 40)
    for path in paths[:16]:
        os.makedirs((folder / path).parent, exist_ok=True)
        os.replace(tmp_path / "all" / path, folder / path)
    out = tmp_path / "index"
    build_index(checkpoint, folder, out=out, batch_size=4, shard_size=8, progress=False)
    for path in paths[16:]:
        os.makedirs((folder / path).parent, exist_ok=True)
        os.replace(tmp_path / "all" / path, folder / path)

    encode = MultiSEAPlugin.encode_image_set
    encoded = []

    def counting(self, model, loader, device, fail_at=None):
        if fail_at is not None and len(encoded) == fail_at:
            raise RuntimeError("killed")
        features = encode(self, model, loader, device)
        encoded.append(len(features[0]))
        return features

    monkeypatch.setattr(MultiSEAPlugin, "encode_image_set",
                        lambda self, model, loader, device: counting(self, model, loader, device, fail_at=2))
    with pytest.raises(RuntimeError, match="killed"):
        build_index(checkpoint, folder, out=out, batch_size=4, shard_size=8, progress=False)
    assert encoded == [4, 4]  # one shard of 8 committed, then killed
    progress = json.load(open(out / "progress.json"))
    assert [len(shard["files"]) for shard in progress["shards"]] == [8]
    assert len(SearchIndex.open(out)) == 16  # readers still see the last complete index

    encoded.clear()
    monkeypatch.setattr(MultiSEAPlugin, "encode_image_set", lambda self, model, loader, device:
                        counting(self, model, loader, device))
    resumed = build_index(checkpoint, folder, out=out, batch_size=4, shard_size=8, progress=False)
    assert (resumed.encoded, resumed.reused, resumed.total) == (16, 24, 40) and sum(encoded) == 16
    assert not (out / "progress.json").exists()
    monkeypatch.setattr(MultiSEAPlugin, "encode_image_set", encode)
    fresh = build_index(checkpoint, folder, out=tmp_path / "fresh", batch_size=4, shard_size=8, progress=False)
    assert_same_index(SearchIndex.open(out), SearchIndex.open(fresh.out), queries)


def odd_files(folder, demo_split) -> dict:
    """Broken and unusual files beside 6 demo pictures -> {"skipped": [...], "rotated",
    "upright", "rgba", "on_white"}."""
    for index in range(6):
        (folder / f"ok{index}.jpg").write_bytes(demo_split.image_bytes(index))
    jpeg = demo_split.image_bytes(10)
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 700, dtype=np.uint8).tobytes())
    (folder / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image at all\n")
    (folder / "readme.txt").write_text("not a picture name: not indexed\n")
    (folder / ".hidden.jpg").write_bytes(jpeg)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 52), dtype=np.uint8), "L").save(folder / "gray.JPEG")
    pixels = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    pixels[:, :28, 3] = 0  # the left half transparent
    pixels[:, 28:, 3] = 255
    Image.fromarray(pixels, "RGBA").save(folder / "rgba.png")
    on_white = pixels[..., :3].copy()
    on_white[:, :28] = 255
    Image.fromarray(on_white).save(folder / "on_white.png")
    # a phone picture: pixels stored rotated, EXIF orientation 6 (rotate 90 degrees clockwise to view)
    upright = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif, quality=95)
    with Image.open(folder / "rotated.jpg") as stored:  # the decoded JPEG, turned upright by hand (lossless)
        stored.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(folder / "upright.png")
    return {"skipped": ["corrupt.jpg", "empty.png", "notes.jpg", "truncated.jpg"], "jpeg": jpeg}


def test_unreadable_files_are_skipped_and_odd_ones_indexed(tmp_path, monkeypatch, demo_split, checkpoints):
    import hat.search.build as build

    folder = tmp_path / "pictures"
    folder.mkdir()
    made = odd_files(folder, demo_split)
    checkpoint = checkpoints["hat"]
    report = build_index(checkpoint, folder, batch_size=4, shard_size=8, progress=False)
    assert report.skipped == made["skipped"] and report.total == 12 and report.encoded == 12
    assert report.reasons["empty.png"] == "empty file, 0 bytes"
    assert report.reasons["corrupt.jpg"].startswith("UnidentifiedImageError: cannot identify image file")
    summary = report.summary().splitlines()
    assert summary[1].startswith("skipped 4 unreadable file(s): corrupt.jpg (UnidentifiedImageError: ")
    manifest = json.load(open(os.path.join(report.out, "manifest.json")))
    assert [entry["path"] for entry in manifest["skipped"]] == made["skipped"]
    assert manifest["skipped"][3]["size"] == os.path.getsize(folder / "truncated.jpg")

    index = SearchIndex.open(report.out)
    assert ".hidden.jpg" not in index.paths and "gray.JPEG" in index.paths and "one_pixel.png" in index.paths
    row = {path: i for i, path in enumerate(index.paths)}
    levels = lambda path: [f[row[path]] for f in index.features]  # noqa: E731
    assert_same_features(levels("rotated.jpg"), levels("upright.png"))  # the EXIF orientation applied
    assert_same_features(levels("rgba.png"), levels("on_white.png"))  # transparency over white
    retriever = index.retriever  # Retriever opens files the same way: the same pixels
    assert_same_features([f[0] for f in retriever.encode_images(str(folder / "rotated.jpg"))], levels("rotated.jpg"))
    with Image.open(folder / "rotated.jpg") as stored:  # as stored, without the orientation: other features
        raw = retriever.encode_images(Image.fromarray(np.asarray(stored.convert("RGB"))))
    assert (raw[0][0] - levels("rotated.jpg")[0]).abs().max() > 1e-3

    opened, open_image = [], build.open_image

    def counting_open(path):
        opened.append(os.path.basename(path))
        return open_image(path)

    monkeypatch.setattr(build, "open_image", counting_open)
    again = build_index(checkpoint, folder, batch_size=4, shard_size=8, progress=False)
    assert (again.encoded, again.skipped, opened) == (0, made["skipped"], [])  # not tried again: unchanged
    (folder / "truncated.jpg").write_bytes(made["jpeg"])  # repaired
    fixed = build_index(checkpoint, folder, batch_size=4, shard_size=8, progress=False)
    assert (fixed.encoded, fixed.total, fixed.skipped, opened) == (1, 13, made["skipped"][:3], ["truncated.jpg"])


def test_foreign_folders_and_other_checkpoints_are_refused(tmp_path, demo_pictures, checkpoints):
    def refused(call, *pieces):
        with pytest.raises(SearchError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and all(piece in message for piece in pieces), message
        return message

    missing = tmp_path / "missing"
    refused(lambda: SearchIndex.open(missing), f"index {missing} does not exist", "python -m hat.search index")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "holiday.txt").write_text("mine")
    refused(lambda: SearchIndex.open(tmp_path / "plain"), "is not a search index (no manifest.json)")
    refused(lambda: build_index(checkpoints["hat"], demo_pictures, out=tmp_path / "plain", progress=False),
            "is not a search index (it holds other files", "another --out")
    assert os.listdir(tmp_path / "plain") == ["holiday.txt"]  # left as it was
    for name, manifest, expected in (("other", {"format": "photo-db", "version": 1}, "of format 'photo-db'"),
                                     ("old", {"format": "hat-search-index", "version": 99}, "format version 99"),
                                     ("broken", None, "cannot be read")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{not json" if manifest is None else json.dumps(manifest))
        refused(lambda: SearchIndex.open(tmp_path / name), expected)

    folder = tmp_path / "pictures"
    copy_pictures(demo_pictures, folder, 6)
    checkpoint = str(tmp_path / "mine.ckpt")
    shutil.copy(checkpoints["hat"], checkpoint)
    out = build_index(checkpoint, folder, progress=False).out
    other = checkpoints["multisea"]
    refused(lambda: build_index(other, folder, progress=False), f"index {out} was built with checkpoint {checkpoint}",
            f"not {other}", "new --out", "--rebuild")
    replaced = build_index(other, folder, progress=False, rebuild=True)
    assert replaced.encoded == 6 and SearchIndex.open(out).model_name == "multisea"
    build_index(checkpoint, folder, progress=False, rebuild=True)

    shutil.copy(checkpoints["multisea"], checkpoint)  # the same path, other content
    refused(lambda: SearchIndex.open(out), f"checkpoint {checkpoint} has changed since index {out} was built",
            "--rebuild")
    refused(lambda: build_index(checkpoint, folder, progress=False), f"checkpoint {checkpoint} has changed",
            "--rebuild")
    os.remove(checkpoint)
    refused(lambda: SearchIndex.open(out), f"checkpoint {checkpoint}, which no longer exists")
    refused(lambda: build_index(checkpoint, folder, progress=False), f"checkpoint {checkpoint} does not exist")
    refused(lambda: build_index(other, tmp_path / "nowhere", progress=False), "is not a folder")


def test_queries_and_k_are_checked_and_long_queries_truncated(demo_indexes, queries):
    index = SearchIndex.open(demo_indexes["hat"])
    for query, expected in (("", "the query is empty"), (" \t\n", "the query is empty"),
                            (b"a dog", "the query is bytes, not text"), (None, "has type NoneType, not str"),
                            ("caf\udce9", r"not valid UTF-8 \(byte 0xe9 at character 3\)"),
                            ("\x00\x01", "has no word the model's tokenizer reads")):
        with pytest.raises(SearchError, match=expected):
            index.search([queries[0], query], 5)
    for k in (0, -1, True, 2.5, "3"):
        with pytest.raises(SearchError, match=r"^k=.* is not a positive integer; pass k >= 1"):
            index.search(queries, k)
    with pytest.raises(SearchError, match="no queries"):
        index.search([], 5)

    long = " ".join(["a red circle in the top left and a blue square"] * 6)  # 66 words, max_text_len 32
    note = index.check_query(long)
    assert note.startswith("the query is 66 word pieces long and the model reads the first 30 (max_text_len=32): "
                           "'a blue square a red circle")
    [hits] = index.search([long], 5)
    assert hits.note == note
    assert as_pairs([hits]) == index.retriever.search([long], index.features, k=5)  # the truncated query
    assert index.check_query(queries[0]) is None


def test_resolve_only_indexed_paths_and_hat_attention(demo_indexes, demo_pictures, queries):
    from hat.gallery import heatmap

    index = SearchIndex.open(demo_indexes["hat"])
    assert index.resolve("sub/demo000.JPG") == str(demo_pictures / "sub" / "demo000.JPG")
    for path in ("../sub/demo000.JPG", str(demo_pictures / "demo001.jpg"), "sub/../demo001.jpg", "missing.jpg",
                 "", ".hat-index/manifest.json", None):
        with pytest.raises(SearchError, match="is not a picture of index"):
            index.resolve(path)

    levels = index.attention(queries[0], "demo001.jpg")
    assert [level["label"] for level in levels] == ["level 1: stage 2, layer 2", "level 2: stage 3, layer 4",
                                                   "level 3: stage 4, layer 6"]
    words = levels[0]["words"]
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    for level, regions in zip(levels, (64, 16, 4)):
        weights = np.asarray(level["weights"])
        assert weights.shape == (len(words), regions) and level["grid"][0] * level["grid"][1] == regions
        assert level["scale_max"] == pytest.approx(weights.max()) and level["direction"] == "i2t"
    view = index.view("demo001.jpg")
    assert view.size == (64, 64)
    assert heatmap(view, np.asarray(levels[0]["weights"][1]), tuple(levels[0]["grid"]),
                   scale_max=levels[0]["scale_max"]).startswith("data:image/png;base64,")
    with pytest.raises(SearchError, match="is not a picture of index"):
        index.attention(queries[0], "../x.jpg")
    multisea = SearchIndex.open(demo_indexes["multisea"])
    with pytest.raises(SearchError, match=r"^model=multisea \(Multi-SEA\) has no attention maps"):
        multisea.attention(queries[0], "demo001.jpg")
