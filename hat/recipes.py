"""What differs between training HAT and training Multi-SEA, behind one small interface
that run.py's loop (checkpoints, resume, signals, DDP, validation) drives.

A recipe builds the model, the training dataset, the optimizer and scheduler, runs one
training step on a (per-rank) batch and evaluates a split:

    recipe = RECIPES[c["model"]](c)
    model = recipe.build_model(pretrained=not c["test_only"])
    recipe.setup_training(model, steps_per_epoch, amp_dtype)  # optimizer, scheduler, scaler
    for epoch ...:
        recipe.start_epoch(model, epoch)                      # freezing schedule
        for batch ...: loss, skipped = recipe.step(network, model, batch, device, epoch, gather)
        recipe.end_epoch()
"""
from __future__ import annotations

import torch

from datamodules.datasets import CaptionPairs, OneCaptionPerImage


class HATRecipe:
    """HAT (spec hat.md): caption-level batches, VSE++ loss, Adam + StepLR per epoch,
    backbones frozen for the first epochs, fp16/bf16 autocast on CUDA."""

    def __init__(self, c: dict):
        self.c = c
        self.optimizer = self.scheduler = self.scaler = self.amp_dtype = None

    pad_to = None  # captions padded to the longest in the batch

    def build_model(self, pretrained: bool):
        from hat.model import build_hat

        c = self.c
        return build_hat(
            c["image_backbone"], c["text_backbone"], c["level_pairs"], embed_dim=c["embed_dim"],
            lambda_softmax=c["lambda_softmax"], direction=c["direction"], image_size=c["image_size"],
            image_pretrained=c["image_pretrained"] and pretrained,
            text_pretrained=c["text_pretrained"] and pretrained, image_weights=c["image_weights"],
            image_backbone_kwargs={**swin_kwargs(c), **c["image_backbone_kwargs"]},
            text_dropout=c["text_dropout"],
        )

    def training_data(self, split, tokenizer, transform):
        return CaptionPairs(split, tokenizer, transform, self.c["max_text_len"])

    def setup_training(self, model, steps_per_epoch: int, amp_dtype) -> None:
        c = self.c
        self.amp_dtype = amp_dtype
        self.optimizer = torch.optim.Adam(model.parameters(), lr=c["learning_rate"])
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, c["lr_step_epochs"], c["lr_gamma"])
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def start_epoch(self, model, epoch: int) -> None:
        model.set_backbones_trainable(image=epoch >= self.c["freeze_image_epochs"],
                                      text=epoch >= self.c["freeze_text_epochs"])

    def step(self, network, model, batch, device, epoch: int, gather) -> tuple[float, bool]:
        from hat.engine import train_step

        c = self.c
        return train_step(network, batch, self.optimizer, device, c["margin"],
                          hardest_negative=epoch >= c["vse_warmup_epochs"],
                          same_image_mask=c["same_image_mask"], scaler=self.scaler,
                          amp_dtype=self.amp_dtype, gather=gather)

    def end_epoch(self) -> None:
        self.scheduler.step()

    def evaluate(self, model, images, captions, caption_to_image, device) -> dict:
        from hat.evaluation import evaluate

        metrics, _ = evaluate(model, images, captions, caption_to_image, device,
                              self.c["image_tile"], self.c["caption_tile"])
        return metrics


class MultiSEARecipe:
    """Multi-SEA (spec multisea.md): one random caption per image per epoch, captions
    padded to max_text_len, ITC + hierarchical ITM, AdamW over four groups, warm-up +
    cosine stepped per optimizer step, gradient accumulation from ``per_gpu_batchsize``
    micro-batches to ``batch_size``, grad-norm clip; ITC shortlist + ITM re-rank."""

    def __init__(self, c: dict):
        self.c = c
        self.optimizer = self.scheduler = self.scaler = None

    @property
    def pad_to(self) -> int:
        return self.c["max_text_len"]

    def build_model(self, pretrained: bool):
        from hat.multisea import build_multisea

        c = self.c
        model = build_multisea(
            c["image_backbone"], c["text_backbone"], vision_depth=c["vision_depth"],
            image_size=c["image_size"], image_pretrained=c["image_pretrained"] and pretrained,
            text_pretrained=c["text_pretrained"] and pretrained, image_weights=c["image_weights"],
            image_backbone_kwargs=c["image_backbone_kwargs"],
            frozen_vision_blocks=c["frozen_vision_blocks"], freeze_vision_stem=c["freeze_vision_stem"],
            embed_dim=c["embed_dim"], num_layers=c["fusion_layers"], num_heads=c["fusion_heads"],
            mlp_ratio=c["fusion_mlp_ratio"], dropout=c["fusion_dropout"], num_agents=c["num_agents"],
            activation=c["activation"], queue_size=c["queue_size"], itm_layers=c["itm_layers"],
            temp_init=c["temp_init"],
        )
        if c["freeze_text_encoder"]:
            model.text_encoder.requires_grad_(False)
        return model

    def training_data(self, split, tokenizer, transform):
        return OneCaptionPerImage(split, tokenizer, transform, self.c["max_text_len"], self.c["seed"])

    def setup_training(self, model, steps_per_epoch: int, amp_dtype) -> None:
        from hat.multisea.training import build_optimizer, cosine_schedule

        c = self.c
        self.optimizer = build_optimizer(model, lr=c["learning_rate"], encoder_lr=c["encoder_lr"],
                                         alpha_lr=c["alpha_lr"], temp_lr=c["temp_lr"],
                                         weight_decay=c["weight_decay"], betas=c["adam_betas"])
        self.scheduler = cosine_schedule(self.optimizer, c["max_epoch"] * steps_per_epoch,
                                         c["warmup_ratio"], c["num_cycles"])

    def start_epoch(self, model, epoch: int) -> None:
        pass  # the backbones' frozen parts are fixed at build time

    def step(self, network, model, batch, device, epoch: int, gather) -> tuple[float, bool]:
        from hat.multisea.training import train_step

        losses = train_step(network, model, batch, self.optimizer, self.scheduler, device,
                            self.c["per_gpu_batchsize"], self.c["clip_norm"], gather=gather)
        return losses["loss"], False

    def end_epoch(self) -> None:
        pass  # the schedule steps per optimizer step

    def evaluate(self, model, images, captions, caption_to_image, device, n_folds=None) -> dict:
        from hat.multisea.rerank import evaluate

        metrics, _ = evaluate(model, images, captions, caption_to_image, device, k=self.c["top_k"],
                              n_folds=n_folds)
        return metrics


def swin_kwargs(c) -> dict:
    """timm Swin overrides from the swin_* keys (None: the named model's own)."""
    kwargs = {"drop_path_rate": c["drop_path_rate"]}
    for key in ("embed_dim", "depths", "num_heads", "window_size"):
        if c[f"swin_{key}"] is not None:
            kwargs[key] = c[f"swin_{key}"]
    return kwargs


RECIPES = {"hat": HATRecipe, "multisea": MultiSEARecipe}
