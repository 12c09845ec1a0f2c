"""A tiny Multi-SEA (2-block 32 px CLIP ViT, 1-layer BERT, 2-layer AFormer) for fast tests."""
import pytest
import torch

TINY_VIT = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 17 tokens
TINY_AFORMER = dict(embed_dim=32, num_layers=2, num_heads=4, num_agents=8, queue_size=10,
                    itm_layers=(1, 2))


def build_tiny(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    from hat.models.multisea.encoders import build_clip_vision
    from hat.models.multisea.model import MultiSEA

    torch.manual_seed(seed)
    vit = build_clip_vision(**TINY_VIT)
    text = BertModel(BertConfig(vocab_size=100, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=64))
    return MultiSEA(vit, text, **{**TINY_AFORMER, **overrides})


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(seed=0, **MultiSEA kwargs) -> a fresh tiny MultiSEA."""
    return build_tiny


@pytest.fixture
def tiny_batch():
    """4 pairs (images 0, 0, 1, 2), captions of 8 tokens, the second one padded after 5."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    input_ids = torch.randint(5, 100, (4, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    return images, input_ids, attention_mask, torch.tensor([0, 0, 1, 2])
