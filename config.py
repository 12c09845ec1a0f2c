"""The experiment and its configuration: HAT on Flickr30K by default.

Selectors pick the recipe: ``model`` (hat | multisea), ``dataset`` (f30k | coco | demo)
and ``demo_recipe`` (the demo's small models). The named configs only set them (``with multisea``, ``with coco_config``,
``with demo``), so they compose in any order and with any key:
``python run.py with multisea coco_config per_gpu_batchsize=16``. The values that depend
on the selectors (the Multi-SEA recipe, the demo's tiny models) are filled in below from
them; anything given on the command line wins.
"""
from sacred import Experiment

ex = Experiment("HAT", save_git_info=False)


@ex.config
def hat_defaults():
    model = "hat"  # hat | multisea (with multisea)
    dataset = "f30k"  # f30k | coco | demo (with coco_config, with demo)
    exp_name = f"{model}_{dataset}"  # name of the experiment (checkpoint folder when no observer)
    seed = 0  # seeds python, numpy and torch

    data_root = None  # folder holding the ViLT-format arrow files (README, "Data")
    raw_root = None  # prepare_data: folder with the images and dataset_{flickr30k,coco}.json
    skip_missing_images = False  # prepare_data: leave out images whose file is absent
    image_size = 224  # input resolution
    image_transform = "hat"  # hat: RandomResizedCrop+flip / Resize+CenterCrop; plain: resize only; clip: CLIP resize+crop+norm
    max_text_len = 32  # tokens including [CLS] and [SEP]
    captions_per_image = 5  # test protocol: first 5 captions per image; None keeps every caption
    num_workers = 8  # data loader processes
    demo_train_images = 2000  # dataset=demo only: training images generated
    demo_eval_images = 200  # dataset=demo only: val and test images generated (each)

    image_backbone = "swin_base_patch4_window7_224.ms_in22k"  # timm Swin name
    image_pretrained = True  # load timm weights (hub download, or image_weights)
    image_weights = None  # local timm/Microsoft Swin checkpoint (.pth, .bin, .safetensors)
    drop_path_rate = 0.1  # Swin stochastic depth
    swin_embed_dim = None  # Swin architecture override (None: the named model's own)
    swin_depths = None  # Swin architecture override, e.g. [2, 2, 2, 2]
    swin_num_heads = None  # Swin architecture override
    swin_window_size = None  # Swin architecture override
    image_backbone_kwargs = {}  # more timm create_model overrides (e.g. a tiny ViT for Multi-SEA)
    text_backbone = "bert-base-uncased"  # HF hub name, local folder, or packaged-minilm
    text_pretrained = True  # load the text backbone's weights
    text_dropout = None  # None: the text backbone's own dropout; 0.0 turns it off
    level_pairs = [[2, 4], [3, 10], [4, 12]]  # (Swin stage, BERT layer), 1-based: low, mid, high
    embed_dim = 768  # HAT: width of the six projections (Multi-SEA: the AFormer width)
    lambda_softmax = 9.0  # SCAN attention temperature
    direction = "i2t"  # i2t: regions attend to words; t2i: words attend to regions

    margin = 0.2  # VSE++ triplet margin
    vse_warmup_epochs = 0  # epochs summing over all negatives before the hardest negative
    same_image_mask = False  # True: captions of the same image in a batch are not negatives

    per_gpu_batchsize = 58  # training batch per process (captions, each with its image)
    batch_size = None  # global batch over all processes; None: per_gpu_batchsize x world size
    learning_rate = 1e-4  # HAT: Adam, no weight decay (Multi-SEA: its AFormer/projections/heads group)
    lr_step_epochs = 10  # StepLR step
    lr_gamma = 0.1  # StepLR factor
    max_epoch = 100  # training epochs
    freeze_image_epochs = 11  # Swin frozen in epochs 0-10, unfrozen at the end of epoch 10
    freeze_text_epochs = 11  # BERT embeddings+encoder likewise (the pooler stays frozen)
    precision = "fp16"  # fp16 | bf16 | fp32: mixed precision on CUDA; CPU runs fp32
    device = "auto"  # auto | cpu | cuda | cuda:N
    select_metric = ["i2t_r1", "t2i_r1"]  # best checkpoint = highest sum of these val metrics

    eval_batch_size = 128  # images / captions per encoding batch
    image_tile = None  # scoring tile (images); None picks a size that bounds memory
    caption_tile = None  # scoring tile (captions)
    per_level = True  # test: also report each level alone (level1_* .. levelK_* in the metrics)
    eval_folds = None  # test: also the mean over this many consecutive folds (folds_*; MSCOCO 1K: 5)
    ensemble = []  # test_only: average the level scores of these checkpoints (HAT (*): i2t + t2i model)
    ensemble_directions = []  # per ensemble member (or for checkpoint=); []: the recorded direction
    feature_cache = None  # directory for encoded test features per checkpoint (re-scoring skips encoding)
    feature_dtype = None  # features in memory: fp16 | bf16 | fp32; None: fp16 on CUDA, fp32 on CPU

    # Multi-SEA only (model=multisea); spec multisea.md, the released YAML
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
    encoder_lr = 1e-6  # AdamW group of the two backbones (learning_rate: fusion, projections, heads)
    alpha_lr = 1e-4  # AdamW group of the enhancement gate alpha
    temp_lr = 5e-4  # AdamW group of the temperature tau
    weight_decay = 0.05  # AdamW, every group
    adam_betas = [0.9, 0.98]  # AdamW betas
    warmup_ratio = 0.15  # linear warm-up share of all optimizer steps, then cosine
    num_cycles = 0.3  # cosine cycles over the rest (ends at 0.345 x peak)
    clip_norm = 1.0  # gradient-norm clip

    if model == "multisea":  # the published recipe; batch_size is the effective batch
        image_backbone = "vit_base_patch16_clip_quickgelu_224.openai"  # timm CLIP ViT-B/16
        text_backbone = "roberta-base"
        image_transform = "clip"  # Resize(bicubic) + CenterCrop, CLIP mean/std, train and test
        max_text_len = 40  # every caption padded to 40 tokens
        embed_dim = 768
        batch_size = 500  # one optimizer step per 500 pairs (gradient accumulation)
        per_gpu_batchsize = 20  # micro-batch per process
        learning_rate = 1e-5  # AFormer, projections, poolers, ITM head
        max_epoch = 200
        precision = "fp32"  # (TF32 matmuls on CUDA)
        select_metric = ["rsum"]
        checkpoint_every_steps = 100

    test_only = False  # evaluate checkpoint on the test split, no training
    checkpoint = None  # with test_only=True: a project checkpoint or a released HAT/Multi-SEA one
    observer_dir = "runs"  # Sacred FileStorageObserver directory; None records nothing
    checkpoint_dir = None  # where checkpoints go; None: the run's observer directory
    checkpoint_every_steps = 1000  # also write last.ckpt every N training steps (0: epoch ends only)
    resume = False  # continue the latest run of this configuration in observer_dir
    resume_from = None  # continue from this last.ckpt (exactly where it stopped)
    progress = True  # progress bars
    log_every_steps = 0  # also log train.step_loss every N steps (0: per-epoch metrics only)


    demo_recipe = dataset == "demo"  # the demo's small models below (with demo); also on other data
    if demo_recipe:
        # The embedded demo: synthetic shapes at 64 px, a tiny random image backbone and
        # the packaged MiniLM BERT. Runs on a laptop CPU in minutes with no download: the
        # data are generated on first use into ~/.cache/hat-toolkit (or $HAT_CACHE),
        # unless data_root names a folder.
        image_size = 64
        image_transform = "plain"  # captions name positions: no crops or flips
        num_workers = 0
        image_pretrained = False
        text_backbone = "packaged-minilm"
        max_text_len = 32
        if model == "hat":
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
        else:
            image_backbone = "vit_base_patch16_clip_quickgelu_224"  # architecture only
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


@ex.named_config
def coco_config():
    # MSCOCO (train = train + restval, Karpathy 5K test; the 1K protocol next to it)
    dataset = "coco"
    eval_folds = 5  # report MSCOCO 1K (5 folds) next to MSCOCO 5K


@ex.named_config
def multisea():
    # Multi-SEA: CLIP ViT-B/16 + RoBERTa-base, AFormer, ITC + hierarchical ITM, re-rank
    model = "multisea"


@ex.named_config
def t2i():
    # HAT (t-i): words attend to regions, in training and at test time
    direction = "t2i"


@ex.named_config
def demo():
    # The embedded demo (see demo_recipe above): with demo, with multisea demo
    dataset = "demo"
    demo_recipe = True
