"""A third model defined outside the toolkit, through the plug-in interface alone: a tiny
dual encoder (pooled pixels and a bag of word embeddings, each through a linear layer)
scored by cosine similarity, trained with InfoNCE (or, for the accumulation tests, a
per-pair loss that decomposes over samples)."""
import os

import torch
import torch.nn.functional as F
from torch import nn

from hat.plugins import ModelPlugin, register, unregister


def toy_config(model, demo_recipe):
    if model == "toy":
        toy_dim = 16  # joint embedding width
        toy_loss = "infonce"  # infonce | pairwise (decomposes over samples)
        toy_temperature = 0.1
        learning_rate = 3e-3
        per_gpu_batchsize = 16
        max_epoch = 1
        image_transform = "plain"


class ToyDualEncoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, pooled: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.image_proj = nn.Linear(3 * pooled * pooled, dim)
        self.words = nn.Embedding(vocab_size, dim)
        self.text_proj = nn.Linear(dim, dim)

    def encode_images(self, images):  # [B, 3, H, W] -> [B, D], unit length
        return F.normalize(self.image_proj(self.pool(images).flatten(1)), dim=-1)

    def encode_captions(self, input_ids, attention_mask):  # [B, L] -> [B, D], unit length
        weights = attention_mask.float()[..., None]  # [B, L, 1]
        words = (self.words.weight[input_ids] * weights).sum(1) / weights.sum(1)  # [B, D]
        return F.normalize(self.text_proj(words), dim=-1)

    def forward(self, images, input_ids, attention_mask):
        return self.encode_images(images) @ self.encode_captions(input_ids, attention_mask).t()  # [B, B]


def toy_loss(scores: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """InfoNCE over the batch (both directions), or the per-pair loss 1 - s_ii (a mean of
    per-sample terms)."""
    if kind == "pairwise":
        return (1 - scores.diagonal()).mean()
    targets = torch.arange(len(scores), device=scores.device)
    logits = scores / temperature
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class ToyPlugin(ModelPlugin):
    name = "toy"
    title = "Toy"
    config = staticmethod(toy_config)

    def build(self, pretrained: bool):
        from hat.backbones import load_tokenizer

        return ToyDualEncoder(len(load_tokenizer(self.c["text_backbone"])), self.c["toy_dim"])

    def training_data(self, split, tokenizer, transform):
        from datamodules.datasets import CaptionPairs

        return CaptionPairs(split, tokenizer, transform, self.c["max_text_len"])

    def loss(self, network, model, batch, epoch, gather=None):
        scores = network(batch["images"], batch["input_ids"], batch["attention_mask"])
        return {"loss": toy_loss(scores, self.c["toy_loss"], self.c["toy_temperature"]),
                "mean_positive": scores.diagonal().mean()}

    def optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.c["learning_rate"])

    def scheduler(self, optimizer, steps_per_epoch):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), "epoch"

    def evaluate(self, model, data, device, options):
        from hat.checkpoint import load_model_weights
        from hat.evaluation import encode_loader, fold_metrics, recall
        from hat.plugins import Evaluation

        info = {}
        for path in options.checkpoints:
            info.update(checkpoint=os.path.abspath(path), checkpoint_format=load_model_weights(model, path)["format"])
        model.eval()
        with torch.no_grad():
            images = encode_loader(data.images, lambda batch: [model.encode_images(batch.to(device))])[0]
            captions = encode_loader(data.captions, lambda batch: [model.encode_captions(
                batch["input_ids"].to(device), batch["attention_mask"].to(device))])[0]
            sims = images @ captions.t()  # [N_images, N_captions]
        model.train()
        metrics = recall(sims, data.caption_to_image)
        if options.n_folds:
            metrics.update(fold_metrics(lambda rows, columns, fold_to_image: recall(
                sims[rows].index_select(1, columns), fold_to_image), options.n_folds, sims.shape[0],
                data.caption_to_image, sims.shape[1]))
        return Evaluation(metrics, info)


def registered_toy():
    """Register the toy model (a context for tests: unregistered afterwards)."""
    class Registration:
        def __enter__(self):
            register(ToyPlugin)
            return ToyPlugin

        def __exit__(self, *exc):
            unregister(ToyPlugin.name)

    return Registration()
