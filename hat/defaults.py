"""The runner's configuration keys and their defaults, shared by every model, as Sacred
config functions (config.py adds them to the experiment; each model's own keys come from
its plug-in's config function), and `default_config`: the same defaults without a run."""
from __future__ import annotations

import os

from sacred.config.config_scope import ConfigScope
from sacred.config.utils import chain_evaluate_config_scopes


def runner_defaults():
    model = "hat"  # a registered model: hat | multisea (with multisea)
    dataset = "f30k"  # f30k | coco | demo (with flickr, with coco_config, with demo) | a name you prepared
    demo_recipe = dataset == "demo"  # the demo's small models (with demo); also on other data
    exp_name = f"{model}_{dataset}"  # name of the experiment (checkpoint folder when no observer)
    seed = 0  # seeds python, numpy and torch

    data_root = None  # folder holding the ViLT-format arrow files (README, "Data")
    raw_root = None  # prepare_data: folder with the images and dataset_{flickr30k,coco}.json
    skip_missing_images = False  # prepare_data: leave out images whose file is absent
    captions = None  # prepare_data: your captions file (CSV/TSV, JSON Lines, COCO JSON, Flickr8k.token.txt) for dataset=NAME
    image_column = "image"  # prepare_data, captions: the column/field holding the image path (relative to raw_root)
    caption_column = "caption"  # prepare_data, captions: the column/field holding the caption
    val_images = 0.05  # prepare_data, captions without a split column: val pictures (count or fraction)
    test_images = 0.05  # prepare_data, captions without a split column: test pictures (count or fraction)
    image_size = 224  # input resolution
    image_transform = "hat"  # hat: RandomResizedCrop+flip / Resize+CenterCrop; plain: resize only; clip: CLIP resize+crop+norm
    text_backbone = "bert-base-uncased"  # HF hub name, local folder, or packaged-minilm (also the tokenizer)
    max_text_len = 32  # tokens including [CLS] and [SEP]
    # test protocol: first 5 captions per image; None keeps every caption (your own data: any count)
    captions_per_image = 5 if dataset in ("f30k", "coco", "demo") else None
    num_workers = min(8, os.cpu_count() or 1)  # data loader processes (at most one per CPU core)
    demo_train_images = 2000  # dataset=demo only: training images generated
    demo_eval_images = 200  # dataset=demo only: val and test images generated (each)
    verify_val_images = None  # before training, decode every val image (None: when the split has <= 2000)

    per_gpu_batchsize = 32  # micro-batch each process runs
    batch_size = None  # global batch of one optimizer step; None: per_gpu_batchsize x processes
    accumulation = "split"  # micro-batches of a step: split (each its own loss) | exact (one loss over the whole batch)
    max_epoch = 10  # training epochs
    clip_norm = None  # clip the gradient norm to this (None: no clipping)
    precision = "auto"  # auto (the model's choice on CUDA, fp32 on CPU) | fp16 | bf16 | fp32
    device = "auto"  # auto | cpu | cuda | cuda:N
    select_metric = ["rsum"]  # best checkpoint = highest sum of these val metrics

    eval_batch_size = 128  # images / captions per encoding batch
    eval_folds = None  # test: also the mean over this many consecutive folds (folds_*; MSCOCO 1K: 5)
    test_only = False  # evaluate checkpoint on the test split, no training
    checkpoint = None  # test_only: a project checkpoint or a released one to evaluate
    observer_dir = "runs"  # Sacred FileStorageObserver directory; None records nothing
    checkpoint_dir = None  # where checkpoints go; None: the run's observer directory
    checkpoint_every_steps = 1000  # also write last.ckpt every N training steps (0: epoch ends only)
    resume = False  # continue the latest run of this configuration
    resume_from = None  # continue from this last.ckpt (exactly where it stopped)
    progress = True  # progress bars
    log_every_steps = 0  # also log train.step_loss every N steps (0: per-epoch metrics only)
    tensorboard = False  # True (<run folder>/tensorboard) or a directory: TensorBoard event files of the logged scalars
    gallery = True  # after the test: gallery.html + retrievals.json in the run's folder (hat.gallery)
    n_queries = 20  # gallery: sample captions and sample images shown (chosen with seed)
    gallery_dir = None  # gallery: where it is written; None: the run's folder


def demo_defaults(demo_recipe):
    if demo_recipe:
        # The embedded demo: synthetic shapes at 64 px and the packaged MiniLM BERT, with
        # each model's tiny recipe (see its plug-in). Runs on a laptop CPU in minutes with
        # no download: the data are generated on first use into ~/.cache/hat-toolkit (or
        # $HAT_CACHE), unless data_root names a folder.
        image_size = 64
        num_workers = 0
        text_backbone = "packaged-minilm"
        max_text_len = 32


def default_selectors() -> dict:
    """{"model", "dataset"}: what a run selects when nothing is named (`runner_defaults`)."""
    config = ConfigScope(runner_defaults)()
    return {"model": config["model"], "dataset": config["dataset"]}


def default_config(model: str | None = None, dataset: str | None = None, **updates) -> dict:
    """The configuration a run of ``model`` on ``dataset`` (None: the default selectors)
    starts from (the runner's defaults, the model's recipe, the demo's small models when
    ``dataset="demo"``), with ``updates`` applied like command-line keys. Plain dict; no
    Sacred run is created."""
    from hat.plugins import get_plugin

    selectors = default_selectors()
    model, dataset = model or selectors["model"], dataset or selectors["dataset"]
    plugin = get_plugin(model)
    scopes = [ConfigScope(runner_defaults)] + ([ConfigScope(plugin.config)] if plugin.config else []) + [
        ConfigScope(demo_defaults)]
    config, _ = chain_evaluate_config_scopes(scopes, fixed={"model": model, "dataset": dataset, **updates})
    return dict(config)
