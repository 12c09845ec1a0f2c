"""HAT as a plug-in of the toolkit: its recipe (config), model, loss, optimizer, freezing
schedule, evaluation and released checkpoints (see hat/plugins.py for the interface)."""
from __future__ import annotations

import os

import torch

from hat.plugins import ConfigProblem, ModelPlugin
from hat.rules import integer, number


def hat_config(model, demo_recipe):
    # HAT's keys and the paper's recipe (Flickr30K and MSCOCO alike)
    if model == "hat":
        image_backbone = "swin_base_patch4_window7_224.ms_in22k"  # the image encoder, a timm name (HAT: a Swin; Multi-SEA: a CLIP ViT)
        image_pretrained = True  # load the image encoder's pretrained weights (hub download, or image_weights)
        image_weights = None  # a local weight file of the image encoder (.pth, .bin, .safetensors)
        drop_path_rate = 0.1  # Swin stochastic depth
        swin_embed_dim = None  # Swin architecture override (None: the named model's own)
        swin_depths = None  # Swin architecture override, e.g. [2, 2, 2, 2]
        swin_num_heads = None  # Swin architecture override
        swin_window_size = None  # Swin architecture override
        image_backbone_kwargs = {}  # more timm create_model overrides
        text_pretrained = True  # load the text backbone's weights
        text_dropout = None  # None: the text backbone's own dropout; 0.0 turns it off
        level_pairs = [[2, 4], [3, 10], [4, 12]]  # (Swin stage, BERT layer), 1-based: low, mid, high
        embed_dim = 768  # width of the joint space (HAT: its six projections; Multi-SEA: the AFormer)
        lambda_softmax = 9.0  # SCAN attention temperature
        direction = "i2t"  # i2t: regions attend to words; t2i: words attend to regions
        margin = 0.2  # VSE++ triplet margin
        vse_warmup_epochs = 0  # epochs summing over all negatives before the hardest negative
        same_image_mask = False  # True: captions of the same image in a batch are not negatives
        recompute_scores = True  # training: score tiles recomputed in backward (memory of one tile, not B^2)
        accumulation = "exact"  # one loss over the whole batch: hardest negatives among all its pairs
        per_gpu_batchsize = 58  # micro-batch per process (captions, each with its image)
        learning_rate = 1e-4  # peak learning rate (HAT: Adam, no weight decay; Multi-SEA: AdamW, see its *_lr)
        lr_step_epochs = 10  # StepLR step
        lr_gamma = 0.1  # StepLR factor
        max_epoch = 100  # training epochs
        freeze_image_epochs = 11  # Swin frozen in epochs 0-10, unfrozen at the end of epoch 10
        freeze_text_epochs = 11  # BERT embeddings+encoder likewise (the pooler stays frozen)
        select_metric = ["i2t_r1", "t2i_r1"]  # best checkpoint = highest sum of these val metrics
        image_tile = None  # scoring tile (images); None picks a size that bounds memory
        caption_tile = None  # scoring tile (captions)
        per_level = True  # test: also report each level alone (level1_* .. levelK_* in the metrics)
        ensemble = []  # test_only: average the level scores of these checkpoints (HAT (*): i2t + t2i model)
        ensemble_directions = []  # per ensemble member (or for checkpoint=); []: the recorded direction
        feature_cache = None  # directory for encoded test features per checkpoint (re-scoring skips encoding)
        feature_dtype = None  # features in memory: fp16 | bf16 | fp32; None: fp16 on CUDA, fp32 on CPU
        if demo_recipe:  # a tiny random Swin + the packaged MiniLM: minutes on a CPU
            image_transform = "plain"  # captions name positions: no crops or flips
            image_pretrained = False
            image_backbone = "swin_base_patch4_window7_224"
            swin_embed_dim = 32
            swin_depths = [2, 2, 2, 2]
            swin_num_heads = [1, 2, 4, 8]
            swin_window_size = 4
            drop_path_rate = 0.0
            level_pairs = [[2, 2], [3, 4], [4, 6]]
            embed_dim = 128
            vse_warmup_epochs = 1
            per_gpu_batchsize = 64
            learning_rate = 5e-4
            lr_step_epochs = 2
            max_epoch = 2
            freeze_image_epochs = 0  # the tiny Swin starts from random weights
            freeze_text_epochs = 1000  # MiniLM is pretrained: keep it frozen


class HATPlugin(ModelPlugin):
    """HAT: caption-level batches, VSE++ loss with the hardest negative, Adam + StepLR per
    epoch, backbones frozen for the first epochs; scores are SCAN similarities summed
    over the levels."""

    name = "hat"
    title = "HAT"
    config = staticmethod(hat_config)
    cuda_precision = "fp16"  # precision=auto on CUDA
    architecture_keys = ("image_backbone", "swin_embed_dim", "swin_depths", "swin_num_heads", "swin_window_size",
                         "image_backbone_kwargs", "text_backbone", "level_pairs", "embed_dim")
    scoring_keys = ("direction", "lambda_softmax")
    released_module = "hat.models.hat.released"  # is_released / load_released_state_dict
    released_format = "released-hat"
    released_keys = "vit_model.*"
    key_rules = {
        "lr_step_epochs": integer(1, why="StepLR's step in epochs"), "lr_gamma": number(above=0),
        "freeze_image_epochs": integer(0), "freeze_text_epochs": integer(0), "vse_warmup_epochs": integer(0),
        "image_tile": integer(1, none=True, why="images per scoring tile; None picks one"),
        "caption_tile": integer(1, none=True, why="captions per scoring tile; None picks one"),
        "drop_path_rate": number(at_least=0, below=1), "text_dropout": number(at_least=0, below=1, none=True),
    }

    def validate(self, fail) -> None:
        from hat.backbones import text_limits

        c = self.c
        num_stages = len(c["swin_depths"] or (2, 2, 18, 2))
        text_depth = text_limits(c["text_backbone"])[0]
        pairs = c["level_pairs"]
        if not isinstance(pairs, (list, tuple)) or not pairs or not all(
                isinstance(pair, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                for pair in pairs):
            fail("level_pairs", "a non-empty list of [image stage, text layer] pairs of integers, "
                                "e.g. [[2,4],[3,10],[4,12]]")
        for pair in pairs:
            if len(pair) != 2 or not 1 <= pair[0] <= num_stages:
                fail("level_pairs", f"[image stage 1..{num_stages}, text layer] pairs")
            if not 1 <= pair[1] <= (text_depth or pair[1]):
                fail("level_pairs", f"text layers 1..{text_depth} of {c['text_backbone']}")
        if not isinstance(c["margin"], (int, float)) or not c["margin"] > 0:
            fail("margin", "a number > 0 (the triplet hinge needs a margin; SCAN a positive temperature)")
        if not isinstance(c["lambda_softmax"], (int, float)) or not c["lambda_softmax"] > 0:
            fail("lambda_softmax", "a number > 0 (the SCAN softmax temperature)")
        if c["direction"] not in ("i2t", "t2i"):
            fail("direction", ["i2t", "t2i"])
        if not isinstance(c["recompute_scores"], bool):
            fail("recompute_scores", "True (score tiles recomputed in backward: bounded memory) or False")
        self.validate_test_keys(fail)

    def validate_test_keys(self, fail) -> None:
        """The test-time keys: ensemble members, their directions, the feature dtype."""
        from hat.models.hat.evaluation import FEATURE_DTYPES

        c = self.c
        ensemble, directions = c["ensemble"], c["ensemble_directions"]
        if not isinstance(ensemble, (list, tuple)):
            fail("ensemble", "a list of checkpoint paths, e.g. ensemble=\"['i2t.ckpt','t2i.ckpt']\"")
        if ensemble:
            if not c["test_only"] or c["checkpoint"]:
                raise ConfigProblem("ensemble=[...] evaluates existing checkpoints: use it with test_only=True "
                                    "and without checkpoint=")
            for path in ensemble:
                if not os.path.isfile(str(path)):
                    raise ConfigProblem(f"ensemble: {path} does not exist; pass the paths of existing checkpoints")
        if not isinstance(directions, (list, tuple)) or any(d not in ("i2t", "t2i") for d in directions) \
                or (directions and len(directions) != max(len(ensemble), 1)):
            fail("ensemble_directions", "[] (each checkpoint's recorded direction) or one of 'i2t'/'t2i' "
                                        "per ensemble member")
        if c["feature_dtype"] not in FEATURE_DTYPES:
            fail("feature_dtype", list(FEATURE_DTYPES))

    def build(self, pretrained: bool):
        from hat.models.hat.model import build_hat

        c = self.c
        return build_hat(
            c["image_backbone"], c["text_backbone"], c["level_pairs"], embed_dim=c["embed_dim"],
            lambda_softmax=c["lambda_softmax"], direction=c["direction"], image_size=c["image_size"],
            image_pretrained=c["image_pretrained"] and pretrained,
            text_pretrained=c["text_pretrained"] and pretrained, image_weights=c["image_weights"],
            image_backbone_kwargs={**swin_kwargs(c), **c["image_backbone_kwargs"]},
            text_dropout=c["text_dropout"], recompute_scores=c["recompute_scores"],
        )

    @staticmethod
    def accepts(model) -> bool:
        from hat.models.hat.model import HAT

        return isinstance(model, HAT)

    def training_data(self, split, tokenizer, transform):
        from datamodules.datasets import CaptionPairs

        return CaptionPairs(split, tokenizer, transform, self.c["max_text_len"])

    def loss(self, network, model, batch: dict, epoch: int, gather=None) -> dict:
        positive_mask = self.positive_mask([batch], gather)
        scores = network(batch["images"], batch["input_ids"], batch["attention_mask"], gather=gather)  # [B, B]
        return self.vse(scores, positive_mask, epoch)

    def encode_batch(self, network, model, batch: dict, first=None) -> dict:
        """The levels' region and word features and the caption lengths of a micro-batch
        (through ``network``'s forward). While the text encoder is frozen its layers are
        kept too (``"text_layers"``, unused by the loss) and the replay (``first`` given)
        takes them from ``first`` instead of running it again: the text encoder runs after
        the image encoder and only its deterministic projections follow it, so the replay
        draws the same random numbers for everything it does run."""
        frozen = not any(param.requires_grad for param in model.text_encoder.parameters())
        text_layers = first.get("text_layers") if first is not None and frozen else None
        return network(batch["images"], batch["input_ids"], batch["attention_mask"], encode_only=True,
                       keep_text_layers=frozen, text_layers=text_layers)

    def loss_from_features(self, model, features: list, batches: list, epoch: int, gather=None) -> dict:
        """`loss` over the whole optimizer-step batch: the micro-batches' features joined and
        scored as one [B, B] matrix (memory-bounded by recompute_scores), so the hardest
        negative is drawn from all B pairs."""
        from hat.models.hat.model import join_features

        positive_mask = self.positive_mask(batches, gather)
        return self.vse(model.batch_scores(join_features(features), gather=gather), positive_mask, epoch)

    def positive_mask(self, batches: list, gather=None):
        """same_image_mask: [B, B] True where two pairs of the batch (every process's) share
        their image; None otherwise."""
        if not self.c["same_image_mask"]:
            return None
        index = torch.cat([batch["image_index"] for batch in batches])
        index = gather(index) if gather is not None else index
        return index[:, None] == index[None, :]

    def vse(self, scores, positive_mask, epoch: int) -> dict:
        """VSE++ of a batch score matrix: the hardest negative from vse_warmup_epochs on."""
        from hat.models.hat.loss import vse_loss

        c = self.c
        return {"loss": vse_loss(scores.float(), c["margin"], epoch >= c["vse_warmup_epochs"], positive_mask)}

    def optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.c["learning_rate"])

    def scheduler(self, optimizer, steps_per_epoch: int):
        return torch.optim.lr_scheduler.StepLR(optimizer, self.c["lr_step_epochs"], self.c["lr_gamma"]), "epoch"

    def start_epoch(self, model, epoch: int) -> None:
        model.set_backbones_trainable(image=epoch >= self.c["freeze_image_epochs"],
                                      text=epoch >= self.c["freeze_text_epochs"])

    def test_checkpoints(self) -> list:
        return list(self.c["ensemble"]) or super().test_checkpoints()

    def evaluate(self, model, data, device, options):
        """Summed-level recalls of the model as it is, of a checkpoint, or of the mean of
        several checkpoints' level matrices (an ensemble: HAT (*)). At test time also the
        per-level recalls (per_level) and the feature cache (feature_cache,
        feature_dtype); the 1K folds as ``options.n_folds`` says."""
        from hat.checkpoint import load_model_weights, read_checkpoint_file
        from hat.evaluation import default_feature_dtype
        from hat.models.hat.evaluation import (FEATURE_DTYPES, checkpoint_levels, ensemble_similarities,
                                               protocol_metrics)
        from hat.plugins import Evaluation

        c = self.c
        test = options.split == "test"
        feature_dtype = FEATURE_DTYPES[c["feature_dtype"]] if test else None
        members, scored = [], []
        for index, path in enumerate(options.checkpoints or [None]):
            cache = None
            if path is not None:
                state = read_checkpoint_file(path)
                loaded = load_model_weights(model, path, state)
                model.direction = member_direction(c, index, state)
                del state
                scored.append({"checkpoint": os.path.abspath(path), "format": loaded["format"],
                               "direction": model.direction})
                if test and c["feature_cache"]:
                    feature_dtype = feature_dtype or default_feature_dtype(device)
                    cache = self.feature_cache(path, options.split, feature_dtype, data.files)
            members.append(checkpoint_levels(model, data, device, feature_dtype, cache, c["image_tile"],
                                             c["caption_tile"]))
            if path is not None:
                print(f"scored {path} ({loaded['format']}, direction {model.direction})", flush=True)
        levels = members[0] if len(members) == 1 else ensemble_similarities(members)
        del members
        metrics, sims = protocol_metrics(levels, data.caption_to_image, test and c["per_level"], options.n_folds)
        return Evaluation(metrics, scored_info(scored),
                          {"sims": sims, "i2t": sims, "t2i": sims} if options.keep_scores else {})

    def feature_cache(self, checkpoint: str, split: str, feature_dtype, data_files):
        """The feature cache file of ``checkpoint`` on ``split``, keyed by everything the
        features depend on (`hat.models.hat.evaluation.feature_cache_path`)."""
        from hat.models.hat.evaluation import feature_cache_path

        c = self.c
        return feature_cache_path(c["feature_cache"], checkpoint, split, extra=(
            c["dataset"], c["image_size"], c["image_transform"], c["max_text_len"], c["captions_per_image"],
            feature_dtype, *((key, c[key]) for key in self.architecture_keys)), data_files=data_files)

    def table_rows(self, metrics: dict) -> list[str]:
        """One line per level (when per_level added the ``level{k}_*`` keys)."""
        from hat.models.hat.evaluation import level_rows

        return level_rows(metrics)

    def gallery_attention(self, model, images, input_ids, attention_mask, device):
        """Per pair and level, the SCAN weights of the model's direction (word x region);
        none for an ensemble (no single model's attention produced its scores)."""
        if len(self.c["ensemble"]) > 1:
            return None
        from hat.evaluation import eval_mode
        from hat.models.hat.alignment import scan_attention

        with eval_mode(model), torch.no_grad():
            image_levels = model.encode_images(images.to(device))
            caption_levels = model.encode_captions(input_ids.to(device), attention_mask.to(device))
        pairs = []
        for pair, length in enumerate(attention_mask.sum(dim=1).tolist()):
            pairs.append([{"label": f"level {k + 1}: stage {stage}, layer {layer}", "direction": model.direction,
                           "weights": scan_attention(images_k[pair], captions_k[pair, :length], model.direction,
                                                     model.lambda_softmax).cpu()}
                          for k, (images_k, captions_k, (stage, layer)) in enumerate(
                              zip(image_levels, caption_levels, self.c["level_pairs"]))])
        return pairs

    def encode_image_set(self, model, loader, device):
        """Per level [N_images, R, D] (fp16 on CUDA, as evaluate keeps them)."""
        from hat.evaluation import default_feature_dtype, encode_images, eval_mode

        with eval_mode(model):
            return encode_images(model, loader, device, default_feature_dtype(device))

    def encode_caption_set(self, model, loader, device):
        """{"captions": per level [N_captions, L, D], "lengths": [N_captions]}."""
        from hat.evaluation import default_feature_dtype, eval_mode
        from hat.models.hat.evaluation import encode_captions

        with eval_mode(model):
            levels, lengths = encode_captions(model, loader, device, default_feature_dtype(device))
        return {"captions": levels, "lengths": lengths}

    def score_sets(self, model, image_features, caption_features, rerank: bool = False):
        """The summed level scores, in the model's direction (what evaluate ranks)."""
        from hat.models.hat.evaluation import level_similarities
        from hat.models.hat.model import summed_levels

        return summed_levels(level_similarities(model, {"images": image_features, **caption_features},
                                                self.c["image_tile"], self.c["caption_tile"]))


def scored_info(scored: list) -> dict:
    """What the run records of the checkpoints scored: the path (a list for an ensemble, with
    each member's format and direction under ``ensemble``) and the format."""
    if not scored:
        return {}
    info = {"checkpoint": scored[0]["checkpoint"] if len(scored) == 1 else [m["checkpoint"] for m in scored],
            "checkpoint_format": scored[0]["format"]}
    if len(scored) > 1:
        info["ensemble"] = scored
    return info


def member_direction(c, index: int, state) -> str:
    """Scoring direction of checkpoint ``index`` (its contents: ``state``):
    ensemble_directions[index] if given; an ensemble member's recorded direction (project
    checkpoints); else ``direction``."""
    if c["ensemble_directions"]:
        return c["ensemble_directions"][index]
    if c["ensemble"] and isinstance(state, dict):
        return (state.get("config") or {}).get("direction", c["direction"])
    return c["direction"]


def swin_kwargs(c) -> dict:
    """timm Swin overrides from the swin_* keys (None: the named model's own)."""
    kwargs = {"drop_path_rate": c["drop_path_rate"]}
    for key in ("embed_dim", "depths", "num_heads", "window_size"):
        if c[f"swin_{key}"] is not None:
            kwargs[key] = c[f"swin_{key}"]
    return kwargs
