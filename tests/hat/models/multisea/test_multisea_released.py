"""The authors' released Multi-SEA checkpoints: key layout and a full-size round trip
(ViT-B/16 with 11 blocks + RoBERTa-base, random weights, nothing downloaded)."""

import pytest
import torch

from hat.checkpoint import load_model_weights, read_checkpoint_file
from hat.models.multisea.model import build_multisea
from hat.models.multisea.released import (CLIP_TEXT_LEFTOVERS, is_released_multisea, load_released_state_dict,
                                   to_released_state_dict)
from hat.models.multisea.rerank import rerank_scores
from tests.conftest import read_key_list

FULL = dict(image_pretrained=False, text_pretrained=False)  # the defaults are the paper's model


def released_layout() -> dict:
    """key -> (shape, dtype), from the list of the authors' checkpoint keys."""
    return read_key_list("multisea_state_dict.txt")


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_multisea(**FULL).eval()


@pytest.fixture(scope="module")
def lightning_file(full_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("released") / "multisea_released.ckpt"
    torch.save({"state_dict": to_released_state_dict(full_model), "epoch": 37, "global_step": 4321,
                "hyper_parameters": {"config": {"top_k": 64, "queue_size": 1000, "num_top_layer": 4}}}, path)
    return path


def _scores(model):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    input_ids = torch.randint(3, 50265, (3, 40), generator=generator)
    input_ids[:, 0] = 0  # <s>
    mask = torch.ones_like(input_ids)
    mask[1, 12:] = 0
    input_ids[1, 12:] = 1  # <pad>
    with torch.no_grad():
        image_feats, image_states = model.encode_images(images)
        text_feats, text_states = model.encode_captions(input_ids, mask)
    i2t, t2i = rerank_scores(model, image_feats, image_states, text_feats, text_states, mask, k=64)
    return image_feats, text_feats, i2t, t2i


def test_the_paper_architecture_offline(full_model):
    config = full_model.text_encoder.config
    assert (config.vocab_size, config.max_position_embeddings, config.type_vocab_size, config.pad_token_id,
            config.layer_norm_eps) == (50265, 514, 1, 1, 1e-5)
    vit = full_model.visual_encoder
    assert len(vit.blocks) == 11 and vit.blocks[0].mlp.act.__class__.__name__ == "QuickGELU"
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.7", "blocks.8", "blocks.9", "blocks.10", "norm"}
    assert full_model.alpha.item() == pytest.approx(0.7) and full_model.temp.item() == 1.0


def test_converter_produces_every_listed_key_shape_and_dtype(full_model):
    produced = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in
                to_released_state_dict(full_model).items()}
    assert produced == released_layout()


def test_lightning_file_round_trip_gives_identical_scores(full_model, lightning_file):
    torch.manual_seed(1)
    fresh = build_multisea(**FULL).eval()
    state = read_checkpoint_file(str(lightning_file))
    assert is_released_multisea(state["state_dict"]) and state["epoch"] == 37
    assert state["hyper_parameters"]["config"]["top_k"] == 64
    probe = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = fresh.encode_images(probe)[0]
    info = load_model_weights(fresh, str(lightning_file))  # the runner's safe loading path
    assert info["format"] == "released-multisea"
    after, expected = _scores(fresh), _scores(full_model)
    assert info["loaded"] == len(released_layout()) - len(CLIP_TEXT_LEFTOVERS)
    assert info["skipped"] == sorted(CLIP_TEXT_LEFTOVERS)
    with torch.no_grad():
        assert not torch.allclose(before, full_model.encode_images(probe)[0])
    for got, want in zip(after, expected):
        assert torch.equal(got, want)
    assert (after[2] != -100).all()  # k = 64 > 3 captions: every pair re-ranked
    for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        assert torch.equal(getattr(fresh, name), getattr(full_model, name))


def test_mismatched_released_checkpoint_lists_keys_and_position_ids_are_skipped(full_model):
    state = to_released_state_dict(full_model)
    state["text_encoder.embeddings.position_ids"] = torch.arange(514).view(1, 514)  # transformers 4.27 files
    info = load_released_state_dict(full_model, state)
    assert "text_encoder.embeddings.position_ids" in info["skipped"]

    state.pop("aformer.encoder.layers.3.image_expert.ffn.dense4.bias")
    state["visual_encoder.visual.proj"] = torch.zeros(768, 512)
    state["visual_encoder.visual.class_embedding"] = torch.zeros(1, 1, 768)
    state["image_queue"] = torch.zeros(768, 4096)
    with pytest.raises(ValueError) as error:
        load_released_state_dict(full_model, state)
    message = str(error.value)
    assert "missing 1 ['aformer.encoder.layers.3.image_expert.ffn.dense4.bias']" in message
    assert "unexpected 1 ['visual_encoder.visual.proj']" in message
    assert "image_queue (768, 4096) vs (768, 1000)" in message
    assert "visual_encoder.visual.class_embedding (1, 1, 768) vs (768,)" in message
