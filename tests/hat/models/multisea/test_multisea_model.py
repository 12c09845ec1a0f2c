"""The Multi-SEA module: encoding with the alpha gate, training forward, freezing, backbones."""
import pytest
import torch

from hat.models.multisea.encoders import build_clip_vision, freeze_clip_vision
from hat.models.multisea.losses import itc_loss


def test_encoding_mixes_enhanced_and_projected_features_by_alpha(tiny_model, tiny_batch):
    model = tiny_model().eval()
    images, input_ids, attention_mask, _ = tiny_batch
    with torch.no_grad():
        model.alpha.fill_(0.3)
        image_feats, image_states = model.encode_images(images)
        text_feats, text_states = model.encode_captions(input_ids, attention_mask)

        tokens = model.visual_encoder.forward_features(images)  # V0 [4, 17, 32]
        g = model.vision_proj_f(torch.tanh(model.vision_pooler.dense(tokens[:, 0])))
        e = model.vision_proj_e(tokens)
        h = model.aformer(e, mode="image")[-1]
        pooled = torch.tanh(model.aformer.pooler.dense(h[:, 0]))
        out = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        g_t, e_t = model.text_proj_f(out.pooler_output), model.text_proj_e(out.last_hidden_state)
        h_t = model.aformer(e_t, attention_mask, mode="text")[-1]
    assert image_feats.shape == (4, 32) and image_states.shape == (4, 17, 32)
    assert text_feats.shape == (4, 32) and text_states.shape == (4, 8, 32)
    assert torch.allclose(image_feats, 0.3 * pooled + 0.7 * g, atol=1e-6)
    assert torch.allclose(image_states, 0.3 * h + 0.7 * e, atol=1e-6)
    assert torch.allclose(text_feats, 0.3 * torch.tanh(model.aformer.pooler.dense(h_t[:, 0])) + 0.7 * g_t, atol=1e-6)
    assert torch.allclose(text_states, 0.3 * h_t + 0.7 * e_t, atol=1e-6)


def test_training_forward_clamps_alpha_and_tau(tiny_model, tiny_batch):
    model = tiny_model().train()
    with torch.no_grad():
        model.alpha.fill_(0.95)
        model.temp.fill_(0.01)
    out = model(*tiny_batch, generator=torch.Generator().manual_seed(0))
    assert model.alpha.item() == pytest.approx(0.8) and model.temp.item() == pytest.approx(0.1)
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"])
    assert 0 < out["loss_itm"].item() < 5 and out["loss_itc"].item() > 0


def test_forward_scores_itc_against_the_old_queue_then_writes_the_batch(tiny_model, tiny_batch):
    model = tiny_model().eval()  # no dropout: the same features twice
    images, input_ids, attention_mask, image_index = tiny_batch
    queue_before = (model.image_queue.clone(), model.text_queue.clone(), model.idx_queue.clone())
    with torch.no_grad():
        out = model(images, input_ids, attention_mask, image_index, generator=torch.Generator().manual_seed(0))
        image_feats, _ = model.encode_images(images)
        text_feats, _ = model.encode_captions(input_ids, attention_mask)
    expected_itc = itc_loss(image_feats, text_feats, image_index, *queue_before, model.temp)
    assert torch.allclose(out["loss_itc"], expected_itc, atol=1e-6)
    assert model.queue_ptr.tolist() == [4]  # columns 0-3 hold the batch
    assert model.idx_queue[0, :4].tolist() == [0, 0, 1, 2] and model.idx_queue[0, 4:].eq(-100).all()
    assert torch.allclose(model.image_queue[:, :4], image_feats.t()) and torch.allclose(model.text_queue[:, :4],
                                                                                        text_feats.t())
    assert torch.equal(model.image_queue[:, 4:], queue_before[0][:, 4:])


def test_gradients_reach_fusion_heads_and_scalars(tiny_model, tiny_batch):
    model = tiny_model().train()
    freeze_clip_vision(model.visual_encoder, num_frozen_blocks=1)
    out = model(*tiny_batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    layer = model.aformer.encoder.layers[0]
    for param in (model.itm_head.weight, model.alpha, model.temp, model.vision_pooler.dense.weight,
                  layer.image_expert.cross_attention.attn.query.weight,
                  layer.text_expert.cross_attention.attn.key.weight, layer.text_expert.ffn.dense4.weight,
                  model.visual_encoder.blocks[1].attn.qkv.weight, model.visual_encoder.norm.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    for param in (model.visual_encoder.blocks[0].attn.qkv.weight, model.visual_encoder.patch_embed.proj.weight,
                  model.visual_encoder.pos_embed, model.aformer.encoder.norm.weight,
                  layer.image_expert.cross_attention.attn.dwc.weight):
        assert param.grad is None


def test_gather_hook_feeds_the_queue_and_the_negative_pool(tiny_model, tiny_batch):
    model = tiny_model().train()
    seen = []

    def two_ranks(tensor):  # a second rank holding the same batch
        seen.append(tuple(tensor.shape))
        return torch.cat([tensor, tensor])

    model(*tiny_batch, gather=two_ranks, generator=torch.Generator().manual_seed(0))
    assert model.queue_ptr.tolist() == [8] and model.idx_queue[0, :8].tolist() == [0, 0, 1, 2] * 2
    assert (4, 17, 32) in seen and (4, 8, 32) in seen and (4, 8) in seen  # states and masks gathered


def test_freezing_of_the_clip_tower():
    vit = build_clip_vision(image_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    freeze_clip_vision(vit, num_frozen_blocks=3)
    trainable = {name for name, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vit.named_parameters() if n.startswith(("blocks.3.", "norm."))}


def test_parameter_groups_of_the_recipe(tiny_model):
    model = tiny_model()
    model.visual_encoder.blocks[0].requires_grad_(False)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert {k: g["lr"] for k, g in groups.items()} == {"default": 1e-5, "encoder": 1e-6, "alpha": 1e-4,
                                                        "temp": 5e-4}
    assert all(g["weight_decay"] == 0.05 for g in groups.values())
    assert groups["alpha"]["params"] == [model.alpha] and groups["temp"]["params"] == [model.temp]
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(model.itm_head.weight) in ids["default"] and id(model.text_proj_e.bias) in ids["default"]
    assert id(model.text_encoder.pooler.dense.weight) in ids["encoder"]
    assert id(model.visual_encoder.blocks[0].attn.qkv.weight) not in set().union(*ids.values())
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == sum(1 for p in model.parameters() if p.requires_grad)


def test_packaged_minilm_text_backbone_with_a_tiny_vit():
    from hat.models.multisea.model import build_multisea

    torch.manual_seed(0)
    model = build_multisea("vit_base_patch16_clip_quickgelu_224", "packaged-minilm", vision_depth=2,
                           image_size=32, image_pretrained=False, text_pretrained=True,
                           image_backbone_kwargs=dict(patch_size=8, embed_dim=32, num_heads=2),
                           frozen_vision_blocks=0, freeze_vision_stem=False, embed_dim=48,
                           num_heads=4, num_layers=2, itm_layers=(1, 2)).eval()
    assert model.text_proj_e.in_features == 384 and model.text_proj_e.out_features == 48
    assert all(p.requires_grad for p in model.visual_encoder.parameters())
    input_ids = torch.tensor([[101, 2003, 1037, 3899, 102, 0]])
    with torch.no_grad():
        feats, states = model.encode_captions(input_ids, (input_ids > 0).long())
    assert feats.shape == (1, 48) and states.shape == (1, 6, 48) and torch.isfinite(states).all()
