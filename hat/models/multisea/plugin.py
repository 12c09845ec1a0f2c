"""Multi-SEA as a plug-in of the toolkit: its recipe (config), model, losses, AdamW groups
with the warm-up cosine schedule, evaluation (ITC shortlist + ITM re-rank) and released
checkpoints (see hat/plugins.py for the interface)."""
from __future__ import annotations

import os

from hat.plugins import ModelPlugin
from hat.rules import integer, number

LOSS_KEYS = ("loss", "loss_itc", "loss_itm")


def multisea_config(model, demo_recipe):
    # Multi-SEA's keys and the published recipe (the authors' released YAML)
    if model == "multisea":
        image_backbone = "vit_base_patch16_clip_quickgelu_224.openai"  # timm CLIP ViT-B/16
        image_pretrained = True  # load timm weights (hub download, or image_weights)
        image_weights = None  # local timm CLIP ViT checkpoint
        image_backbone_kwargs = {}  # more timm create_model overrides
        text_backbone = "roberta-base"
        text_pretrained = True  # load the text backbone's weights
        image_transform = "clip"  # Resize(bicubic) + CenterCrop, CLIP mean/std, train and test
        max_text_len = 40  # every caption padded to 40 tokens
        embed_dim = 768  # the AFormer width
        vision_depth = 11  # CLIP ViT blocks kept (of 12)
        frozen_vision_blocks = 7  # first blocks frozen
        freeze_vision_stem = True  # patch embedding, class/positional embeddings, ln_pre frozen
        freeze_text_encoder = False  # True keeps the whole text backbone frozen (the demo's MiniLM)
        fusion_layers = 4  # AFormer layers
        fusion_heads = 12  # AFormer heads
        fusion_mlp_ratio = 4  # Dual-Gate FFN width = ratio x embed_dim
        fusion_dropout = 0.1  # AFormer dropout
        num_agents = 40  # agent tokens of the agent cross-attention
        activation = "hard_swish_clip1"  # Dual-Gate FFN activation (the released checkpoints' variant)
        queue_size = 1000  # ITC negative queue
        temp_init = 1.0  # initial ITC temperature tau (learnable, clamped to [0.1, 3.0])
        itm_layers = [2, 4]  # hierarchical ITM after these AFormer layers
        top_k = 64  # test: ITM re-ranks each query's top-k ITC candidates
        batch_size = 500  # one optimizer step per 500 pairs (gradient accumulation)
        per_gpu_batchsize = 20  # micro-batch per process
        accumulation = "split"  # the authors' recipe: each micro-batch its own ITC, queue write and negatives (exact: one loss over the 500)
        learning_rate = 1e-5  # AdamW: AFormer, projections, poolers, ITM head
        encoder_lr = 1e-6  # AdamW group of the two backbones
        alpha_lr = 1e-4  # AdamW group of the enhancement gate alpha
        temp_lr = 5e-4  # AdamW group of the temperature tau
        weight_decay = 0.05  # AdamW, every group
        adam_betas = [0.9, 0.98]  # AdamW betas
        warmup_ratio = 0.15  # linear warm-up share of all optimizer steps, then cosine
        num_cycles = 0.3  # cosine cycles over the rest (ends at 0.345 x peak)
        clip_norm = 1.0  # gradient-norm clip
        max_epoch = 200
        select_metric = ["rsum"]
        if demo_recipe:  # a tiny random ViT + the packaged MiniLM (frozen): minutes on a CPU
            image_backbone = "vit_base_patch16_clip_quickgelu_224"  # architecture only
            image_pretrained = False
            image_backbone_kwargs = {"patch_size": 8, "embed_dim": 128, "num_heads": 4}
            image_transform = "clip"  # at 64 px: the CLIP normalisation only
            vision_depth = 4
            frozen_vision_blocks = 0  # random weights: the whole ViT trains
            freeze_vision_stem = False
            freeze_text_encoder = True  # MiniLM is pretrained: keep it frozen
            embed_dim = 128
            fusion_layers = 1
            fusion_heads = 4
            fusion_mlp_ratio = 2
            fusion_dropout = 0.0
            itm_layers = [1]
            num_agents = 16
            queue_size = 64
            temp_init = 0.3
            top_k = 16
            batch_size = 64
            per_gpu_batchsize = 64
            learning_rate = 3e-4
            encoder_lr = 3e-4
            max_epoch = 10


class MultiSEAPlugin(ModelPlugin):
    """Multi-SEA: one random caption per image per epoch, captions padded to
    max_text_len, ITC + hierarchical ITM, AdamW over four groups, warm-up + cosine
    stepped per optimizer step; ITC shortlist + ITM re-rank."""

    name = "multisea"
    title = "Multi-SEA"
    config = staticmethod(multisea_config)
    cuda_precision = "fp32"  # the recipe trains in fp32 (TF32 matmuls); bf16/fp16 on request
    architecture_keys = ("image_backbone", "image_backbone_kwargs", "text_backbone", "vision_depth", "embed_dim",
                         "fusion_layers", "fusion_heads", "fusion_mlp_ratio", "num_agents", "activation",
                         "itm_layers", "queue_size")
    scoring_keys = ("top_k",)
    training_unit = "images"
    generator = None  # torch.Generator of the hard-negative draws (None: the global one)
    released_module = "hat.models.multisea.released"  # is_released / load_released_state_dict
    released_format = "released-multisea"
    released_keys = "visual_encoder.visual.*"
    key_rules = {
        "encoder_lr": number(at_least=0), "alpha_lr": number(at_least=0), "temp_lr": number(at_least=0),
        "weight_decay": number(at_least=0), "warmup_ratio": number(at_least=0, at_most=1),
        "num_cycles": number(above=0), "temp_init": number(above=0), "fusion_dropout": number(at_least=0, below=1),
        "vision_depth": integer(1), "frozen_vision_blocks": integer(0), "fusion_heads": integer(1),
        "fusion_mlp_ratio": number(above=0),
    }

    @property
    def pad_to(self) -> int:
        return self.c["max_text_len"]

    def validate(self, fail) -> None:
        c = self.c
        for key in ("top_k", "queue_size", "fusion_layers", "num_agents"):
            if not isinstance(c[key], int) or c[key] < 1:
                fail(key, "a positive integer")
        layers = c["itm_layers"]
        if not isinstance(layers, (list, tuple)) or not layers or any(
                not isinstance(layer, int) or not 1 <= layer <= c["fusion_layers"] for layer in layers):
            fail("itm_layers", f"AFormer layers 1..{c['fusion_layers']} (fusion_layers)")
        betas = c["adam_betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            fail("adam_betas", "two numbers in [0, 1), e.g. [0.9, 0.98]")

    def build(self, pretrained: bool):
        from hat.models.multisea.model import build_multisea

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

    @staticmethod
    def accepts(model) -> bool:
        from hat.models.multisea.model import MultiSEA

        return isinstance(model, MultiSEA)

    def training_data(self, split, tokenizer, transform):
        from datamodules.datasets import OneCaptionPerImage

        return OneCaptionPerImage(split, tokenizer, transform, self.c["max_text_len"], self.c["seed"])

    def loss(self, network, model, batch: dict, epoch: int, gather=None) -> dict:
        """ITC + ITM of a micro-batch; the model writes its queue on the way."""
        model.clamp_scalars_()
        hooks = {} if gather is None else {"gather": gather}
        if self.generator is not None:
            hooks["generator"] = self.generator
        out = network(batch["images"], batch["input_ids"], batch["attention_mask"], batch["image_index"],
                      **hooks)
        return {key: out[key] for key in LOSS_KEYS}

    def encode_batch(self, network, model, batch: dict, first=None) -> dict:
        """Exact accumulation: f_I, F_I, f_T, F_T of a micro-batch (through ``network``'s
        forward; computed again in the replay: the AFormer's dropout follows the text
        encoder, so nothing can be reused)."""
        model.clamp_scalars_()
        return network(batch["images"], batch["input_ids"], batch["attention_mask"], encode_only=True)

    def loss_from_features(self, model, features: list, batches: list, epoch: int, gather=None) -> dict:
        """`loss` over the whole optimizer-step batch: ITC of all its pairs against each
        other and the queue, the queue written once with all of them, the hard negatives
        drawn from all of them (every process's, under DDP), ITM of their 3B pairs. The
        captions of every micro-batch are padded to max_text_len (`pad_to`)."""
        import torch

        joined = {key: torch.cat([part[key] for part in features]) for key in features[0]}
        hooks = {} if gather is None else {"gather": gather}
        out = model.pair_losses(joined, torch.cat([batch["attention_mask"] for batch in batches]),
                                torch.cat([batch["image_index"] for batch in batches]),
                                generator=self.generator, **hooks)
        return {key: out[key] for key in LOSS_KEYS}

    def optimizer(self, model):
        from hat.models.multisea.training import build_optimizer

        c = self.c
        return build_optimizer(model, lr=c["learning_rate"], encoder_lr=c["encoder_lr"], alpha_lr=c["alpha_lr"],
                               temp_lr=c["temp_lr"], weight_decay=c["weight_decay"], betas=c["adam_betas"])

    def scheduler(self, optimizer, steps_per_epoch: int):
        from hat.models.multisea.training import cosine_schedule

        c = self.c
        return cosine_schedule(optimizer, c["max_epoch"] * steps_per_epoch, c["warmup_ratio"],
                               c["num_cycles"]), "step"

    stage_labels = {"itc": "ITC"}  # the gallery shows each result's ITC rank beside the re-ranked one

    def evaluate(self, model, data, device, options):
        """ITC shortlist + ITM re-rank of the model as it is or of one checkpoint; the 1K
        folds (each fold shortlisted within itself) as ``options.n_folds`` says."""
        from hat.checkpoint import load_model_weights
        from hat.models.multisea.rerank import evaluate
        from hat.plugins import Evaluation

        if len(options.checkpoints) > 1:
            raise ValueError("Multi-SEA evaluates one checkpoint at a time")
        info, scores = {}, {}
        if options.checkpoints:
            path = options.checkpoints[0]
            loaded = load_model_weights(model, path)
            info.update(checkpoint=os.path.abspath(path), checkpoint_format=loaded["format"])
        metrics, (i2t, t2i) = evaluate(model, data.images, data.captions, data.caption_to_image, device,
                                       k=self.c["top_k"], n_folds=options.n_folds,
                                       keep=scores if options.keep_scores else None)
        if options.keep_scores:
            scores.update(i2t=i2t, t2i=t2i)
        return Evaluation(metrics, info, scores)

    def encode_image_set(self, model, loader, device):
        """(f_I [N, D], F_I [N, R, D])."""
        from hat.evaluation import encode_images, eval_mode

        with eval_mode(model):
            return tuple(encode_images(model, loader, device))

    def encode_caption_set(self, model, loader, device):
        """(f_T [N, D], F_T [N, L, D], mask [N, L])."""
        from hat.evaluation import eval_mode
        from hat.models.multisea.rerank import encode_caption_set

        with eval_mode(model):
            return encode_caption_set(model, loader, device)

    def score_sets(self, model, image_features, caption_features, rerank: bool = False):
        """ITC scores; ``rerank``: the text->image matrix re-ranked by ITM (each caption's
        top_k images, then the others in ITC order, below them), as evaluate ranks it (its
        t2i half alone: `rerank_scores`' i2t matrix is not computed)."""
        from hat.models.multisea.rerank import itc_scores, t2i_rerank_scores

        if not rerank:
            return itc_scores(model, image_features[0], caption_features[0])
        return t2i_rerank_scores(model, *image_features, *caption_features, k=self.c["top_k"])
