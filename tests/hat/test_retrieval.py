"""hat.load_model: a trained checkpoint used outside the runner scores exactly as the
runner evaluates it (HAT, and Multi-SEA with and without the re-rank)."""
import pytest
import torch

import hat
from hat.plugins import get_plugin
from tests.hat.conftest import runner_scores


def ground_truth_first(sims: torch.Tensor) -> list[int]:
    """Captions (columns) whose own image (caption j belongs to image j // 5) scores highest."""
    return [j for j in range(sims.shape[1]) if int(sims[:, j].argmax()) == j // 5]


def test_hat_loader_scores_like_the_runner(hat_run):
    run, checkpoint, data_root = hat_run
    metrics, scores, images, captions = runner_scores(checkpoint, data_root)
    assert metrics == run.result  # the matrix below is the one the run reported on

    retriever = hat.load_model(checkpoint)
    assert not retriever.model.training and retriever.model.direction == "t2i"  # as recorded
    assert retriever.info["format"] == "hat-toolkit"
    image_features = retriever.encode_images(images)
    score = retriever.score(image_features, retriever.encode_texts(captions))
    assert score.shape == (12, 60) and torch.equal(score, scores["sims"])

    firsts = ground_truth_first(scores["sims"])
    assert firsts  # the tiny model ranks some captions' images first
    results = retriever.search([captions[j] for j in firsts], images, k=3)
    assert [hits[0][0] for hits in results] == [j // 5 for j in firsts]
    assert all(len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1] for hits in results)
    # encoded images work too; one query alone is padded differently: the same ranking
    again = retriever.search(captions[firsts[0]], image_features, k=2)
    assert [i for i, _ in again[0]] == [i for i, _ in results[0][:2]]
    assert [v for _, v in again[0]] == pytest.approx([v for _, v in results[0][:2]], abs=1e-5)


def test_images_as_files_and_overrides(hat_run, tmp_path):
    _, checkpoint, data_root = hat_run
    _, scores, images, captions = runner_scores(checkpoint, data_root)
    paths = []
    for index, image in enumerate(images[:3]):
        paths.append(str(tmp_path / f"{index}.png"))  # lossless: the same pixels
        image.save(paths[-1])
    retriever = hat.load_model(checkpoint)
    from_files = retriever.score(retriever.encode_images(paths), retriever.encode_texts(captions[:4]))
    # other batches (3 images, 4 captions): the same scores up to the last bits of the GEMMs
    torch.testing.assert_close(from_files, scores["sims"][:3, :4], rtol=1e-5, atol=1e-5)
    assert hat.load_model(checkpoint, direction="i2t").model.direction == "i2t"


def test_multisea_loader_scores_like_the_runner_with_and_without_rerank(multisea_run):
    run, checkpoint, data_root = multisea_run
    metrics, scores, images, captions = runner_scores(checkpoint, data_root)
    assert metrics == run.result

    retriever = hat.load_model(checkpoint)
    image_features, text_features = retriever.encode_images(images), retriever.encode_texts(captions)
    assert torch.equal(retriever.score(image_features, text_features), scores["itc"])
    reranked = retriever.score(image_features, text_features, rerank=True)
    assert torch.equal(reranked, scores["t2i"])
    for rerank, sims in ((False, scores["itc"]), (True, scores["t2i"])):
        firsts = ground_truth_first(sims)
        results = retriever.search([captions[j] for j in firsts], image_features, k=1, rerank=rerank)
        assert [hits[0][0] for hits in results] == [j // 5 for j in firsts]


def test_a_released_file_is_recognised_and_a_wrong_model_refused(tmp_path):
    from hat.checkpoint import CheckpointError
    from hat.models.hat.released import to_released_state_dict

    retriever_config = dict(swin_depths=[1, 1, 1, 1], swin_embed_dim=32, swin_num_heads=[1, 2, 4, 8],
                            swin_window_size=4, image_size=64, text_backbone="packaged-minilm", embed_dim=32,
                            image_backbone="swin_base_patch4_window7_224", level_pairs=[[2, 2], [3, 4], [4, 6]])
    plugin = get_plugin("hat")(hat.defaults.default_config("hat", **retriever_config))
    torch.manual_seed(0)
    model = plugin.build(pretrained=False)
    path = tmp_path / "released.ckpt"
    torch.save({"state_dict": to_released_state_dict(model), "epoch": 3}, path)
    loaded = hat.load_model(str(path), **retriever_config)
    assert loaded.info["format"] == "released-hat" and loaded.config["model"] == "hat"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    with pytest.raises(CheckpointError, match="is a released HAT checkpoint; the configured model is a MultiSEA"):
        hat.load_model(str(path), model="multisea")
