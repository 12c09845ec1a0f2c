"""AFormer pieces against literal re-statements of the paper's equations."""
import math

import pytest
import torch

from hat.models.multisea.aformer import (AFormer, AgentAttention, DualGateFFN, RMSNorm, SelfAttentionCore,
                                  hard_swish_clip1, interpolate_agents)

NEG = torch.finfo(torch.float32).min


def test_agent_positions_197_to_40():
    """Agent j mixes the two queries nearest (j + 0.5) * 197 / 40 - 0.5."""
    ramp = torch.arange(197, dtype=torch.float64).view(1, 197, 1)  # query t holds the value t
    positions = interpolate_agents(ramp, 40).view(40)
    expected = torch.tensor([(j + 0.5) * 197 / 40 - 0.5 for j in range(40)], dtype=torch.float64)
    assert torch.allclose(positions, expected, atol=1e-12)
    assert positions[0].item() == pytest.approx(1.9625) and positions[1].item() == pytest.approx(6.8875)
    assert positions[39].item() == pytest.approx(194.0375)

    queries = torch.randn(2, 197, 6, dtype=torch.float64)
    agents = interpolate_agents(queries, 40)  # [2, 40, 6]
    for j in (0, 17, 39):
        low = math.floor(expected[j].item())
        weight = expected[j].item() - low
        mixed = (1 - weight) * queries[:, low] + weight * queries[:, low + 1]
        assert torch.allclose(agents[:, j], mixed, atol=1e-12)


def test_agents_are_the_queries_when_there_are_40():
    queries = torch.randn(3, 40, 12)
    assert torch.equal(interpolate_agents(queries, 40), queries)


def test_hard_swish_with_upper_clip_at_one():
    z = torch.tensor([-4.0, -3.0, -2.5, -1.0, 0.0, 1.0, 5.0])
    expected = torch.tensor([0.0, 0.0, -2.5 * 0.5 / 6, -1 / 6, 0.0, 1 / 6, 5 / 6])
    assert torch.allclose(hard_swish_clip1(z), expected)


def test_rms_norm_in_fp32_with_learnable_scale():
    norm = RMSNorm(2, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 0.5]))
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    rms = math.sqrt(12.5 + 1e-5)
    assert torch.allclose(norm(x), torch.tensor([[2 * 3 / rms, 0.5 * 4 / rms]]))
    # fp16 input: its squares (9e4, 1.6e5) overflow fp16, the fp32 computation does not
    half = torch.tensor([[300.0, 400.0]], dtype=torch.float16)
    rms = math.sqrt(125000 + 1e-5)
    assert torch.allclose(norm(half).float(), torch.tensor([[2 * 300 / rms, 0.5 * 400 / rms]]), atol=1e-3)


def _linear(layer, x):
    return x @ layer.weight.t() + layer.bias


def _heads(x, heads):  # [B, L, D] -> [B, h, L, d]
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def test_dual_gate_ffn_formula():
    torch.manual_seed(0)
    ffn = DualGateFFN(width=6, hidden=10, dropout=0.1, eps=1e-5).eval()
    x = torch.randn(2, 3, 6)

    def phi(z):
        return z * torch.clamp(z + 3, 0, 1) / 6

    u = phi(_linear(ffn.dense1, x))
    v = _linear(ffn.dense2, x)
    o = _linear(ffn.dense3, u * v) * phi(_linear(ffn.dense4, v))
    residual = x + o
    expected = residual / torch.sqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-5) * ffn.ffn_norm.weight
    assert torch.allclose(ffn(x), expected, atol=1e-6)


def test_self_attention_is_bert_attention_with_key_mask():
    torch.manual_seed(0)
    core = SelfAttentionCore(width=8, num_heads=2, dropout=0.1).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    q, k, v = (_heads(_linear(p, x), 2) for p in (core.query, core.key, core.value))
    scores = q @ k.transpose(-1, -2) / 2.0 + (1 - mask[:, None, None, :].float()) * NEG  # sqrt(4) = 2
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 8)
    assert torch.allclose(core(x, mask), expected, atol=1e-6)


def test_agent_attention_two_steps_with_masks():
    """Aggregation Z = softmax(A K^T/sqrt(d) + M_Y) V, diffusion O = softmax(Q A^T/sqrt(d) + M_X^T) Z."""
    torch.manual_seed(0)
    attention = AgentAttention(width=8, num_heads=2, dropout=0.1, num_agents=3).eval()
    x = torch.randn(2, 5, 8)  # queries, Lq = 5
    context = torch.randn(2, 4, 8)  # Lk = 4
    x_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    context_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    queries = _linear(attention.query, x)  # [2, 5, 8]
    agents = torch.stack([  # positions (j + 0.5) * 5 / 3 - 0.5 = 1/3, 2, 11/3
        queries[:, 0] * 2 / 3 + queries[:, 1] / 3,
        queries[:, 2],
        queries[:, 3] / 3 + queries[:, 4] * 2 / 3,
    ], dim=1)
    a, q = _heads(agents, 2), _heads(queries, 2)
    k, v = _heads(_linear(attention.key, context), 2), _heads(_linear(attention.value, context), 2)
    d = 4
    z = (a @ k.transpose(-1, -2) / math.sqrt(d) + (1 - context_mask[:, None, None, :].float()) * NEG
         ).softmax(-1) @ v  # [2, 2, 3, 4]
    o = (q @ a.transpose(-1, -2) / math.sqrt(d) + (1 - x_mask[:, None, :, None].float()) * NEG
         ).softmax(-1) @ z  # [2, 2, 5, 4]
    expected = o.transpose(1, 2).reshape(2, 5, 8)
    got = attention(x, x_mask, context, context_mask)
    assert torch.allclose(got, expected, atol=1e-6)
    # a padded query row is flattened: the plain mean of the agents' values
    assert torch.allclose(got[1, 4], z[1].mean(dim=1).reshape(8), atol=1e-6)
    # the masked context keys 2, 3 of pair 0 play no part
    moved = context.clone()
    moved[0, 2:] += 5.0
    assert torch.allclose(attention(x, x_mask, moved, context_mask)[0], got[0], atol=1e-6)
    # dwc exists for the checkpoints only
    with torch.no_grad():
        attention.dwc.weight.fill_(3.0)
    assert torch.equal(attention(x, x_mask, context, context_mask), got)


def test_modes_pick_the_expert_and_the_cross_attention():
    torch.manual_seed(0)
    aformer = AFormer(width=16, num_layers=2, num_heads=2, num_agents=4).eval()
    images, texts = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        before = {mode: aformer(*args, **kw)[-1] for mode, args, kw in [
            ("image", (images,), dict(mode="image")),
            ("text", (texts, text_mask), dict(mode="text")),
            ("i2t", (images,), dict(mode="i2t", context=texts, context_mask=text_mask)),
            ("t2i", (texts, text_mask), dict(mode="t2i", context=images))]}
        for layer in aformer.encoder.layers:  # change the image expert's agent attention only
            layer.image_expert.cross_attention.attn.value.weight.mul_(3.0)
        assert torch.equal(aformer(images, mode="image")[-1], before["image"])  # enhancement: no cross
        assert torch.equal(aformer(texts, text_mask, mode="t2i", context=images)[-1], before["t2i"])
        assert not torch.allclose(aformer(images, mode="i2t", context=texts, context_mask=text_mask)[-1],
                                  before["i2t"])
        states = aformer(texts, text_mask, mode="text")
        assert len(states) == 2 and torch.equal(states[-1], before["text"])
        assert torch.equal(aformer(texts, text_mask, mode="text", num_layers=1)[0], states[0])
    with pytest.raises(ValueError, match="needs context"):
        aformer(images, mode="i2t")
