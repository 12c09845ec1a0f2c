"""The feature cache keys by content (issue 20, item 1) and is optional (item 8).

A checkpoint or a test file swapped for another of the same size, with its modification
time restored (`touch -r`), must be encoded again; an unchanged file is hashed once (the
digest memo in the cache folder); a cache that cannot be written only warns. The model
here reads its weights from a raw float32 "checkpoint" and its images from a raw float32
"data file", so a swapped file changes the features and the scores.
"""
import os
import time

import numpy as np
import pytest
import torch

from hat.models.hat.evaluation import (cached_features, encode_features, feature_cache_path, level_similarities,
                                       protocol_metrics)

N_IMAGES, WIDTH, DIM = 6, 4, 3


class RawWeightsModel(torch.nn.Module):
    """One level; image features = images @ W, caption features = rows of W picked by the
    token ids; score = dot product of the mean tokens."""

    def __init__(self, checkpoint):
        super().__init__()
        self.weights = torch.from_numpy(np.fromfile(checkpoint, dtype=np.float32)).view(WIDTH, DIM)
        self.calls = 0

    def encode_images(self, images):
        self.calls += 1
        return [(images @ self.weights)[:, None, :].expand(-1, 2, -1)]

    def encode_captions(self, input_ids, attention_mask):
        return [self.weights[input_ids % WIDTH] * attention_mask[..., None]]

    def score(self, image_features, caption_features, lengths, image_tile=None, caption_tile=None):
        images, captions = image_features[0], caption_features[0]
        return images.float().mean(1) @ (captions.float().sum(1) / lengths[:, None]).t()


def raw(seed, count):
    return np.random.default_rng(seed).standard_normal(count).astype(np.float32).tobytes()


def image_loader(data_file):
    images = torch.from_numpy(np.fromfile(data_file, dtype=np.float32)).view(N_IMAGES, WIDTH)
    return torch.utils.data.DataLoader(images, batch_size=4)


CAPTIONS = [{"input_ids": torch.arange(75).view(15, 5) * 7 % 11, "attention_mask": torch.ones(15, 5)},
            {"input_ids": torch.arange(75).view(15, 5) * 3 % 13, "attention_mask": torch.ones(15, 5)}]


@pytest.fixture
def files(tmp_path):
    checkpoint, data = tmp_path / "best.ckpt", tmp_path / "test.arrow"
    checkpoint.write_bytes(raw(0, WIDTH * DIM))
    data.write_bytes(raw(1, N_IMAGES * WIDTH))
    return str(checkpoint), str(data), str(tmp_path / "cache")


def rewrite_in_place(path, content):
    """Same inode, same size, the old modification time put back (as `touch -r`)."""
    stat = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def replace_keeping_times(path, content):
    """Another file (a new inode) moved over ``path``, the old modification time put back."""
    stat = os.stat(path)
    with open(path + ".new", "wb") as handle:
        handle.write(content)
    os.replace(path + ".new", path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def cache_key(checkpoint, data, cache_dir):
    return feature_cache_path(cache_dir, checkpoint, "test", extra=("f30k", torch.float32), data_files=[data])


def scored(checkpoint, data, cache_path=None):
    model = RawWeightsModel(checkpoint)  # HAT's evaluation of one model, as its plug-in composes it
    features = cached_features(model, image_loader(data), CAPTIONS, "cpu", torch.float32, cache_path)
    metrics, sims = protocol_metrics(level_similarities(model, features), None)
    return metrics, sims


def assert_scored_as_without_cache(checkpoint, data, cache_dir, stale_sims):
    metrics, sims = scored(checkpoint, data, cache_key(checkpoint, data, cache_dir))
    true_metrics, true_sims = scored(checkpoint, data)
    torch.testing.assert_close(sims, true_sims, rtol=0, atol=0)
    assert metrics == true_metrics
    assert not torch.equal(sims, stale_sims)  # the swap did change the scores


def test_data_file_rewritten_with_same_size_and_mtime_is_encoded_again(files):
    checkpoint, data, cache_dir = files
    before = cache_key(checkpoint, data, cache_dir)
    assert cache_key(checkpoint, data, cache_dir) == before  # unchanged: the same cache file
    _, stale = scored(checkpoint, data, before)
    rewrite_in_place(data, raw(2, N_IMAGES * WIDTH))  # "re-paired": other content, same size
    assert_scored_as_without_cache(checkpoint, data, cache_dir, stale)
    assert cache_key(checkpoint, data, cache_dir) != before


@pytest.mark.parametrize("swap", [replace_keeping_times, rewrite_in_place])
def test_checkpoint_swapped_for_same_size_one_is_encoded_again(files, swap):
    checkpoint, data, cache_dir = files
    before = cache_key(checkpoint, data, cache_dir)
    _, stale = scored(checkpoint, data, before)
    swap(checkpoint, raw(3, WIDTH * DIM))  # another run's checkpoint: the same byte size
    assert_scored_as_without_cache(checkpoint, data, cache_dir, stale)
    assert cache_key(checkpoint, data, cache_dir) != before


def test_unchanged_files_are_hashed_once_also_by_a_fresh_memo(files, monkeypatch):
    import hat.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "RACY_NS", 50_000_000)  # files older than 50 ms are memoised
    hashed = []
    digest = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: hashed.append(path) or digest(path))
    checkpoint, data, cache_dir = files

    def key_and_score():  # the memo is read from disk each time, and saved with the features
        time.sleep(0.1)  # the files are older than RACY_NS
        path = cache_key(checkpoint, data, cache_dir)
        scored(checkpoint, data, path)
        return path

    first = key_and_score()
    assert sorted(hashed) == sorted([checkpoint, data])
    assert key_and_score() == first and len(hashed) == 2  # not hashed again
    rewrite_in_place(data, raw(2, N_IMAGES * WIDTH))  # the ctime changed: hashed again
    second = key_and_score()
    assert second != first and hashed[2:] == [data]
    replace_keeping_times(checkpoint, raw(3, WIDTH * DIM))  # a new inode: hashed again
    third = key_and_score()
    assert third not in (first, second) and hashed[3:] == [checkpoint]
    os.utime(data, ns=(1, 1))  # touched, the same content: hashed again, the same key
    assert key_and_score() == third and hashed[4:] == [data]
    assert key_and_score() == third and hashed[5:] == []


def test_a_file_changed_right_after_its_hashing_is_not_trusted_to_the_memo(files, monkeypatch):
    """With coarse timestamps a rewrite in the same clock tick as the hashing keeps the
    ctime: a file younger than RACY_NS is hashed every time."""
    import hat.fingerprint as fingerprint

    hashed = []
    digest = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: hashed.append(path) or digest(path))
    now = time.time_ns()
    monkeypatch.setattr(fingerprint, "stat_identity", lambda path: [96, now, 1, 1, now])  # a fresh file
    memo = fingerprint.FingerprintMemo()
    memo.digest(files[1])
    memo.digest(files[1])
    assert hashed == [files[1]] * 2 and memo.entries == {}


def test_corrupt_or_unwritable_memo_is_no_error(files, monkeypatch, capsys):
    import hat.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "RACY_NS", 0)
    checkpoint, data, cache_dir = files
    good = cache_key(checkpoint, data, cache_dir)
    _, sims = scored(checkpoint, data, good)
    memo = os.path.join(cache_dir, "fingerprints.json")
    with open(memo, "w") as handle:
        handle.write('{"version": 1, "files": [')  # cut short
    assert cache_key(checkpoint, data, cache_dir) == good
    assert torch.equal(scored(checkpoint, data, good)[1], sims)  # a hit, and the memo saved again
    with open(memo) as handle:
        assert handle.read().startswith('{"version": 1, "files": {')
    os.remove(memo)
    os.mkdir(memo)  # a memo that can be neither read nor replaced
    os.remove(good)
    capsys.readouterr()
    assert cache_key(checkpoint, data, cache_dir) == good
    assert torch.equal(scored(checkpoint, data, good)[1], sims)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("feature_cache: wrote ") and len(lines) == 2
    assert lines[1].startswith(f"fingerprint: cannot write the hash memo {memo} (")
    assert sorted(os.listdir(cache_dir)) == sorted([os.path.basename(good), "fingerprints.json"])  # no .tmp


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("PytorchStreamWriter failed writing file data/0:\nfile write failed")])  # torch's, two lines
def test_unwritable_cache_warns_once_and_scores_as_without(files, monkeypatch, capsys, error):
    import hat.checkpoint

    checkpoint, data, cache_dir = files
    cache = os.path.join(cache_dir, "best-test.features.pt")

    def full_disk(state, handle):
        handle.write(b"half a file")
        raise error

    monkeypatch.setattr(hat.checkpoint.torch, "save", full_disk)
    model = RawWeightsModel(checkpoint)
    features = cached_features(model, image_loader(data), CAPTIONS, "cpu", torch.float32, cache)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"feature_cache: cannot write {cache} (")
    assert lines[0].endswith("free disk space or set feature_cache= to a writable folder")
    expected = encode_features(model, image_loader(data), CAPTIONS, "cpu", torch.float32)
    for got, want in zip([*features["images"], *features["captions"], features["lengths"]],
                         [*expected["images"], *expected["captions"], expected["lengths"]]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert os.listdir(cache_dir) == []  # nothing half-written
    metrics, sims = scored(checkpoint, data, cache)
    true_metrics, true_sims = scored(checkpoint, data)
    assert metrics == true_metrics and torch.equal(sims, true_sims)


def test_cache_hit_and_write_are_one_line_each(files, capsys):
    checkpoint, data, cache_dir = files
    cache = cache_key(checkpoint, data, cache_dir)
    capsys.readouterr()
    _, written = scored(checkpoint, data, cache)
    assert capsys.readouterr().out.splitlines() == [
        f"feature_cache: wrote features of {N_IMAGES} images / 30 captions to {cache}"]
    _, read = scored(checkpoint, data, cache)
    assert capsys.readouterr().out.splitlines() == [
        f"feature_cache: read features of {N_IMAGES} images / 30 captions from {cache}"]
    torch.testing.assert_close(read, written, rtol=0, atol=0)
