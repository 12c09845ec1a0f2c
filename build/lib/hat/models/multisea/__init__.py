"""Multi-SEA (Tian et al., IP&M 2025): CLIP ViT + RoBERTa, the AFormer fusion module,
ITC-with-queue + hierarchical ITM training, ITC shortlist + ITM re-rank at test time.

    from hat.models.multisea import build_multisea, rerank_scores, rerank_recall
    model = build_multisea(image_pretrained=False, text_pretrained=False)  # full size, no files
    image_feats, image_states = model.encode_images(images)             # [B, 768], [B, 197, 768]
    text_feats, text_states = model.encode_captions(input_ids, mask)    # [B, 768], [B, 40, 768]
"""
from hat.models.multisea.aformer import AFormer
from hat.models.multisea.model import MultiSEA, build_multisea
from hat.models.multisea.released import is_released_multisea, load_released_state_dict, to_released_state_dict
from hat.models.multisea.rerank import evaluate, rerank_recall, rerank_scores

__all__ = ["AFormer", "MultiSEA", "build_multisea", "evaluate", "is_released_multisea",
           "load_released_state_dict", "rerank_recall", "rerank_scores", "to_released_state_dict"]
