"""HAT (Hierarchical Alignment Transformers, ACM MM 2023): Swin stages and BERT layers
paired level by level, each level scored by SCAN cross attention, trained with VSE++.

    from hat.models.hat.model import build_hat
    model = build_hat("swin_base_patch4_window7_224", "bert-base-uncased", [[2, 4], [3, 10], [4, 12]],
                      image_pretrained=False, text_pretrained=False)  # full size, no files
    image_features = model.encode_images(images)                     # per level [B, R, 768]
    caption_features = model.encode_captions(input_ids, mask)       # per level [B, L, 768]
    scores = model.score(image_features, caption_features, mask.sum(1))  # [N_images, N_captions]
"""
