"""AFormer: the Multi-SEA fusion module.

Every layer holds two independent experts, ``image_expert`` and ``text_expert``. An
expert is MHSA -> [agent cross-attention onto the other modality] -> Dual-Gate FFN, each
sub-block post-normed with RMSNorm. The mode picks the expert and whether the agent
cross-attention runs:

    image / text : image / text expert, MHSA -> FFN        (uni-modal enhancement)
    i2t          : image expert, MHSA -> agents onto text -> FFN
    t2i          : text expert,  MHSA -> agents onto image -> FFN

Module and parameter names are the authors' (``encoder.layers.{i}.{text,image}_expert.
{self_attention,cross_attention,ffn}.*``, ``encoder.norm``, ``pooler.dense``), so their
checkpoints load under ``aformer.*`` unchanged. ``encoder.norm`` and every ``attn.dwc``
exist only for that: they are loaded and never used.

Masks are 0/1 [B, L] (1 = real token); they become additive masks with
``torch.finfo(dtype).min`` at padded positions, as transformers' extended masks do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hard_swish_clip1(z: torch.Tensor) -> torch.Tensor:
    """The released checkpoints' gate: z * clip(z + 3, 0, 1) / 6 (upper clip at 1, not 6)."""
    return z * torch.clamp(z + 3.0, min=0.0, max=1.0) / 6.0


ACTIVATIONS = {
    "hard_swish_clip1": hard_swish_clip1,  # the released behaviour
    "hardswish": F.hardswish,  # z * clip(z + 3, 0, 6) / 6
    "silu": F.silu,
    "gelu": F.gelu,
}
MODES = {  # mode -> (expert, runs the agent cross-attention)
    "image": ("image_expert", False),
    "text": ("text_expert", False),
    "i2t": ("image_expert", True),
    "t2i": ("text_expert", True),
}


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """0/1 mask [B, L] -> additive key mask [B, 1, 1, L] (0 or finfo(dtype).min)."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def interpolate_agents(queries: torch.Tensor, num_agents: int) -> torch.Tensor:
    """Agent tokens: queries [B, Lq, D] (heads concatenated) resized along the token axis
    to num_agents positions by linear interpolation (align_corners=False) -> [B, n, D].
    Agent j mixes the two queries nearest position (j + 0.5) * Lq / n - 0.5; Lq = n is
    the identity."""
    return F.interpolate(queries.transpose(1, 2), size=num_agents, mode="linear",
                         align_corners=False).transpose(1, 2)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape  # [B, L, D] -> [B, h, L, D/h]
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_width = x.shape  # [B, h, L, d] -> [B, L, h*d]
    return x.transpose(1, 2).reshape(batch, length, heads * head_width)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (learnable scale, no bias)."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class SelfAttentionCore(nn.Module):
    """BERT self-attention: softmax(Q K^T / sqrt(d) + M) V, dropout on the probabilities."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))
        context = F.scaled_dot_product_attention(  # [B, h, L, d]
            q, k, v, attn_mask=additive_mask(mask, q.dtype),
            dropout_p=self.dropout if self.training else 0.0)
        return merge_heads(context)  # [B, L, D]


class AttentionOutput(nn.Module):
    """x <- RMSNorm(x + Drop(W_o attention))."""

    def __init__(self, width: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.attention_norm = RMSNorm(width, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, attention: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.attention_norm(residual + self.dropout(self.dense(attention)))


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float, eps: float):
        super().__init__()
        self.self = SelfAttentionCore(width, num_heads, dropout)
        self.output = AttentionOutput(width, dropout, eps)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class AgentAttention(nn.Module):
    """Agent cross-attention of queries X [B, Lq, D] onto a context Y [B, Lk, D].

    A = interpolate(W_q X) to n agents;  Z = Drop(softmax(A K^T / sqrt(d) + M_Y)) V;
    O = Drop(softmax(Q A^T / sqrt(d) + M_X^T)) Z. M_Y masks padded context keys; M_X^T
    adds the query's own mask row-wise (it flattens padded query rows; no mask on agents).
    ``dwc`` is an unused 3x3 depth-wise conv kept for the released checkpoints."""

    def __init__(self, width: int, num_heads: int, dropout: float, num_agents: int = 40):
        super().__init__()
        self.num_heads = num_heads
        self.num_agents = num_agents
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dwc = nn.Conv2d(1, 1, kernel_size=3, padding=1)  # unused

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        queries = self.query(x)  # [B, Lq, D]
        agents = split_heads(interpolate_agents(queries, self.num_agents), self.num_heads)  # [B, h, n, d]
        q = split_heads(queries, self.num_heads)  # [B, h, Lq, d]
        k = split_heads(self.key(context), self.num_heads)  # [B, h, Lk, d]
        v = split_heads(self.value(context), self.num_heads)
        p = self.dropout if self.training else 0.0
        aggregated = F.scaled_dot_product_attention(  # aggregation Z: [B, h, n, d]
            agents, k, v, attn_mask=additive_mask(context_mask, q.dtype), dropout_p=p)
        query_rows = additive_mask(x_mask, q.dtype)
        diffused = F.scaled_dot_product_attention(  # diffusion O: [B, h, Lq, d]
            q, agents, aggregated, dropout_p=p,
            attn_mask=None if query_rows is None else query_rows.transpose(-1, -2))  # [B, 1, Lq, 1]
        return merge_heads(diffused)  # [B, Lq, D]


class AgentCrossAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float, eps: float, num_agents: int):
        super().__init__()
        self.attn = AgentAttention(width, num_heads, dropout, num_agents)
        self.output = AttentionOutput(width, dropout, eps)

    def forward(self, x, x_mask, context, context_mask):
        return self.output(self.attn(x, x_mask, context, context_mask), x)


class DualGateFFN(nn.Module):
    """u = phi(W1 x), v = Drop(W2 x), h = u * v; o = Drop(W3 h) * phi(W4 v);
    y = RMSNorm(x + o)  (W1, W2: D -> 4D; W3, W4: 4D -> D)."""

    def __init__(self, width: int, hidden: int, dropout: float, eps: float,
                 activation: str = "hard_swish_clip1"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; allowed: {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[activation]
        self.dense1 = nn.Linear(width, hidden)
        self.dense2 = nn.Linear(width, hidden)
        self.dense3 = nn.Linear(hidden, width)
        self.dense4 = nn.Linear(hidden, width)
        self.ffn_norm = RMSNorm(width, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.activation(self.dense1(x))  # u [B, L, 4D]
        value = self.dropout(self.dense2(x))  # v [B, L, 4D]
        out = self.dropout(self.dense3(gate * value)) * self.activation(self.dense4(value))  # [B, L, D]
        return self.ffn_norm(x + out)


class Expert(nn.Module):
    """MHSA -> [agent cross-attention] -> Dual-Gate FFN (one modality's expert)."""

    def __init__(self, width, num_heads, hidden, dropout, eps, num_agents, activation):
        super().__init__()
        self.self_attention = SelfAttention(width, num_heads, dropout, eps)
        self.cross_attention = AgentCrossAttention(width, num_heads, dropout, eps, num_agents)
        self.ffn = DualGateFFN(width, hidden, dropout, eps, activation)

    def forward(self, x, mask=None, context=None, context_mask=None):
        x = self.self_attention(x, mask)
        if context is not None:
            x = self.cross_attention(x, mask, context, context_mask)
        return self.ffn(x)


class AFormerLayer(nn.Module):
    def __init__(self, **expert_kwargs):
        super().__init__()
        self.text_expert = Expert(**expert_kwargs)
        self.image_expert = Expert(**expert_kwargs)


class AFormerEncoder(nn.Module):
    def __init__(self, num_layers: int, width: int, eps: float, **expert_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(AFormerLayer(width=width, eps=eps, **expert_kwargs)
                                    for _ in range(num_layers))
        self.norm = RMSNorm(width, eps)  # unused; in the released checkpoints


class Pooler(nn.Module):
    """tanh(W h_0) on the first token: [B, L, D] -> [B, D]."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class AFormer(nn.Module):
    """The stack of layers and the shared pooler; see the module docstring for the modes."""

    def __init__(self, width: int = 768, num_layers: int = 4, num_heads: int = 12, mlp_ratio: int = 4,
                 dropout: float = 0.1, num_agents: int = 40, activation: str = "hard_swish_clip1",
                 eps: float = 1e-5):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"AFormer width {width} is not a multiple of {num_heads} heads")
        self.encoder = AFormerEncoder(num_layers, width, eps, num_heads=num_heads,
                                      hidden=width * mlp_ratio, dropout=dropout,
                                      num_agents=num_agents, activation=activation)
        self.pooler = Pooler(width)
        self.apply(_init_weights)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "image",
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                num_layers: int | None = None) -> list[torch.Tensor]:
        """x [B, L, D] (mask [B, L] or None) -> hidden states after each layer, [B, L, D]
        each (the first ``num_layers`` only, default all). Fusion modes need ``context``
        [B, Lk, D] (context_mask [B, Lk] or None)."""
        if mode not in MODES:
            raise ValueError(f"AFormer mode {mode!r}; allowed: {list(MODES)}")
        expert_name, fuses = MODES[mode]
        if fuses != (context is not None):
            raise ValueError(f"AFormer mode {mode!r} {'needs' if fuses else 'takes no'} context")
        states = []
        for layer in self.encoder.layers[:num_layers]:
            x = getattr(layer, expert_name)(x, mask, context, context_mask)
            states.append(x)
        return states


def _init_weights(module: nn.Module) -> None:
    """BERT initialisation of the AFormer (Linear N(0, 0.02), zero bias; norms at 1)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.zeros_(module.bias)
