"""Checks of a run's configuration before any work starts. Every problem is one
`ConfigProblem` line naming the key, its value and the fix; the model's own keys are
checked by its plug-in (`ModelPlugin.validate`)."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from datamodules import DataError, check_data_root
from datamodules.arrow import (CUSTOM_SPLITS, SPLIT_FILES, custom_file, custom_name_problem, fewest_captions,
                               prepare_command)
from datamodules.demo import CAPTIONS_PER_IMAGE as DEMO_CAPTIONS
from datamodules.transforms import TRANSFORM_NAMES
from hat.backbones import text_limits
from hat.checkpoint import describe_error
from hat.distributed import world
from hat.evaluation import METRIC_KEYS
from hat.plugins import ConfigProblem, get_plugin, model_names
from hat.rules import check_rules, integer, number

PRECISIONS = ["fp16", "bf16", "fp32"]


# the runner's numeric keys (each model's own are its plug-in's ``key_rules``)
RUNNER_RULES = {
    "seed": integer(why="seeds python, numpy and torch"),
    "num_workers": integer(0, why="data loader processes; 0 loads in the main process"),
    "image_size": integer(1, why="the input resolution in pixels"),
    "demo_train_images": integer(1), "demo_eval_images": integer(1),
    "per_gpu_batchsize": integer(1), "max_epoch": integer(1), "eval_batch_size": integer(1),
    "embed_dim": integer(1),
    "max_text_len": integer(3, why="tokens with [CLS] and [SEP]: 3 keeps one word piece"),
    "checkpoint_every_steps": integer(0, why="0: last.ckpt at the end of each epoch only"),
    "log_every_steps": integer(0, why="0: per-epoch metrics only"),
    "learning_rate": number(at_least=0, why="0 keeps the weights as they are"),
}


def validate_config(config) -> None:
    """Check ``config`` (a plain dict of the run's configuration); raises ConfigProblem."""
    def fail(key, allowed):
        raise ConfigProblem(f"{key}={config[key]!r} is not valid; allowed: {allowed}")

    validate_choices(config, fail)
    if config["precision"] not in PRECISIONS + ["auto"]:
        fail("precision", f"{PRECISIONS} or 'auto' (the model's choice on CUDA, fp32 on the CPU)")
    if not config["select_metric"] or any(k not in METRIC_KEYS for k in config["select_metric"]):
        fail("select_metric", f"a list of {list(METRIC_KEYS)}")
    check_rules(config, RUNNER_RULES, fail)
    validate_batch(config, fail)
    if config["captions_per_image"] is not None and (not isinstance(config["captions_per_image"], int)
                                                     or config["captions_per_image"] < 1):
        fail("captions_per_image", "a positive integer or None")
    if config["clip_norm"] is not None and (not isinstance(config["clip_norm"], (int, float))
                                            or not config["clip_norm"] > 0):
        fail("clip_norm", "None or a number > 0")
    validate_device(config["device"], fail)
    if resolve_precision(config) != "fp32" and not on_cuda(config):
        fail("precision", f"['fp32'] with model={config['model']} on the CPU (fp16/bf16 autocast is for CUDA; "
                          f"precision=auto runs fp32 here)")
    plugin = get_plugin(config["model"])(config)
    check_rules(config, plugin.key_rules, fail)
    plugin.validate(fail)
    text_tokens = text_limits(config["text_backbone"])[1]
    if text_tokens and config["max_text_len"] > text_tokens:
        fail("max_text_len", f"at most {text_tokens}: {config['text_backbone']} has {text_tokens} "
                             f"token positions")
    if config["test_only"] and not plugin.test_checkpoints():
        raise ConfigProblem("test_only=True needs checkpoint=PATH (a .ckpt written by a run, or a released one)")
    for key in ("checkpoint", "resume_from", "image_weights"):
        if config.get(key) and os.path.isdir(config[key]):
            raise ConfigProblem(f"{key}={config[key]} is a directory; pass the path of a file in it "
                                f"(e.g. {os.path.join(config[key], 'best.ckpt')})")
        if config.get(key) and not os.path.isfile(config[key]):
            raise ConfigProblem(f"{key}={config[key]} does not exist; pass the path of an existing file")
    if config["eval_folds"] is not None and (not isinstance(config["eval_folds"], int)
                                             or config["eval_folds"] < 1):
        fail("eval_folds", "None or a positive integer (5: the MSCOCO 1K protocol)")
    splits = ("test",) if config["test_only"] else ("train", "val", "test")
    if config["dataset"] != "demo":
        try:
            check_data_root(config["data_root"], config["dataset"], splits)
        except DataError as error:
            raise ConfigProblem(str(error)) from None
    validate_caption_count(config, splits[1:] if len(splits) > 1 else splits)
    if not isinstance(config["n_queries"], int) or isinstance(config["n_queries"], bool) or config["n_queries"] < 0:
        fail("n_queries", "a non-negative integer (the gallery's sample captions and images)")
    if config["verify_val_images"] not in (None, True, False):
        fail("verify_val_images", "None (when the val split has at most 2000 images), True or False")
    if not isinstance(config["tensorboard"], (bool, str)):
        fail("tensorboard", "False, True (the run's folder/tensorboard) or a directory")
    writable = ["observer_dir"] + ([] if config["test_only"] else ["checkpoint_dir"]) + ["gallery_dir"]
    if isinstance(config["tensorboard"], str):
        writable.append("tensorboard")
    for key in writable:
        if config[key]:
            check_writable(key, config[key])


def validate_choices(config, fail) -> None:
    """model, image_transform and dataset name something that exists."""
    choices = {"model": model_names(), "image_transform": list(TRANSFORM_NAMES)}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            fail(key, allowed)
    validate_dataset(config, fail)


def validate_dataset(config, fail) -> None:
    """dataset is built in, or a name prepare_data wrote into data_root (one of its
    NAME_caption_<split>.arrow files is there; a missing other split is named by
    check_data_root). A name with none of its files is most likely a typo."""
    dataset, data_root = config["dataset"], config["data_root"]
    if dataset in SPLIT_FILES:
        return
    if custom_name_problem(dataset) is None and data_root and any(
            os.path.isfile(custom_file(data_root, dataset, split)) for split in CUSTOM_SPLITS):
        return
    found = sorted(name for name in prepared_names(data_root) if name not in SPLIT_FILES)
    fail("dataset", f"{sorted(SPLIT_FILES)} or a name prepared into data_root={data_root} "
                    f"({'found: ' + ', '.join(found) if found else 'none there'}; write your own with "
                    f"{prepare_command(dataset, data_root)})")


def prepared_names(data_root) -> set:
    """The NAMEs of the NAME_caption_<split>.arrow files in data_root."""
    if not data_root or not os.path.isdir(data_root):
        return set()
    suffixes = tuple(f"_caption_{split}.arrow" for split in CUSTOM_SPLITS)
    return {name[:-len(suffix)] for name in os.listdir(data_root) for suffix in suffixes if name.endswith(suffix)}


ACCUMULATIONS = ["exact", "split"]


def validate_batch(config, fail) -> None:
    """batch_size is the global batch of one optimizer step: under split accumulation a
    multiple of the micro-batch (per_gpu_batchsize) times the processes; under exact
    accumulation any size of at least the world size (unequal shares per process, a
    smaller last micro-batch: the loss is one over the whole batch); the losses take
    their negatives from the batch, so it needs at least 2 pairs."""
    world_size = world()[1]
    micro, batch = config["per_gpu_batchsize"], config["batch_size"]
    exact = validate_accumulation(config, fail)
    at_least_two = ("a batch of at least 2 pairs over all processes (the loss takes its negatives from the "
                    "batch: with one pair it is 0 on every step)")
    if batch is not None and not isinstance(batch, int):
        fail("batch_size", "None or a positive integer")
    if not config["test_only"]:
        if batch is not None and batch < 2:
            fail("batch_size", at_least_two)
        if micro * world_size < 2:
            fail("per_gpu_batchsize", at_least_two)
    if batch is not None and exact and batch < world_size:
        fail("batch_size", f"None or at least the world size {world_size} (every process takes a share of the batch)")
    if batch is not None and not exact and (batch < 1 or batch % world_size):
        fail("batch_size", f"None or a positive multiple of the world size {world_size} (with "
                           f"per_gpu_batchsize {micro}: of {micro * world_size})")
    if batch is not None and batch % (micro * world_size) and not exact:
        hint = " (or accumulation=exact: its last micro-batch may be smaller)" if get_plugin(
            config["model"]).supports_exact() else ""
        fail("batch_size", f"a multiple of per_gpu_batchsize x world size ({micro} x {world_size} = "
                           f"{micro * world_size}): one optimizer step accumulates batch_size / "
                           f"{micro * world_size} micro-batches{hint}")


def validate_accumulation(config, fail) -> bool:
    """accumulation is exact or split, exact only with a plug-in that has encode_batch and
    loss_from_features. Returns whether it is exact."""
    if config["accumulation"] not in ACCUMULATIONS:
        fail("accumulation", f"{ACCUMULATIONS} (exact: one loss over the whole batch; split: each micro-batch its own)")
    if config["accumulation"] == "exact" and not get_plugin(config["model"]).supports_exact():
        raise ConfigProblem(f"accumulation='exact' is not available with model={config['model']} (its plug-in has "
                            f"no encode_batch/loss_from_features); set accumulation=split")
    return config["accumulation"] == "exact"


def validate_device(name, fail) -> None:
    """``device`` names a device this machine has."""
    try:
        device = torch.device(name) if name != "auto" else None
    except (RuntimeError, TypeError):
        fail("device", "auto, cpu, cuda or cuda:N")
    if device is None or device.type == "cpu":
        return
    if device.type != "cuda":
        fail("device", "auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigProblem(f"device={name}: this machine has no usable CUDA device "
                            f"(torch.cuda.is_available() is False); use device=cpu or device=auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigProblem(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}; pick one of those or device=auto")


def validate_caption_count(config, splits) -> None:
    """captions_per_image against the evaluated splits' fewest captions per image."""
    wanted = config["captions_per_image"]
    if config["dataset"] == "demo":
        fewest = [(DEMO_CAPTIONS, "every demo image")]
    else:
        try:
            found = [fewest_captions(config["data_root"], config["dataset"], split) for split in splits]
        except DataError:  # an unreadable file: its own one-line error comes when it is opened
            return
        fewest = [(count, f"image {image_id} in {path}") for count, image_id, path in filter(None, found)]
    for count, where in fewest:
        if count == 0:
            raise ConfigProblem(f"{where} has no caption: every image of a val/test split needs at least one "
                                f"(its captions are what image->text retrieval ranks); write that split again "
                                f"without it, or with its captions")
        if wanted is not None and count < wanted:
            raise ConfigProblem(f"captions_per_image={wanted} is not valid: {where} has {count} caption(s); "
                                f"set captions_per_image={count} or None (every caption)")


def check_fills_a_batch(config, items: int, unit: str, batch: int) -> None:
    """The training split holds at least one global batch (every step is a full batch)."""
    if items >= batch:
        return
    keys = "per_gpu_batchsize" if config["batch_size"] is None else "batch_size (and per_gpu_batchsize)"
    more = "demo_train_images" if config["dataset"] == "demo" else "a larger training split"
    raise ConfigProblem(f"the training split has {items} {unit}, fewer than one batch of {batch}: set {keys} to at "
                        f"most {items}, or train on more data ({more})")


VERIFY_AT_MOST = 2000  # verify_val_images=None decodes every val image of splits this small


def check_split_images(splits: dict, dataset: str, data_root: str, verify_val=None) -> None:
    """Before the first training step: decode the first image of every split in
    ``splits`` ({name: the opened ArrowSplit}), and every image of the val split when
    ``verify_val`` is True (None: when it has at most VERIFY_AT_MOST images); a bad image
    would otherwise end the run after an epoch. Raises DataError naming the image and its
    file."""
    for split, data in splits.items():
        if len(data) == 0:
            raise DataError(f"the {split} split of dataset={dataset} in data_root={data_root} has no images; "
                            f"write its arrow file again (prepare_data)")
        every = split == "val" and (verify_val or (verify_val is None and len(data) <= VERIFY_AT_MOST))
        start = time.time()
        for index in range(len(data)) if every else (0,):
            data.image(index)
        if every:
            print(f"checked the {len(data)} images of the val split ({time.time() - start:.1f} s; "
                  f"verify_val_images=False skips it)", flush=True)


def check_writable(key: str, folder: str) -> None:
    """``folder`` (or the nearest existing folder above it) accepts new files."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file")
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigProblem(f"{key}={folder} is not writable ({describe_error(error, 120)}); "
                            f"pass a folder you can write to") from None


def on_cuda(config) -> bool:
    """Whether the run's device is a CUDA device."""
    return str(config["device"]).startswith("cuda") or (config["device"] == "auto" and torch.cuda.is_available())


def resolve_precision(config) -> str:
    """precision=auto: the model's choice on CUDA (HAT fp16, Multi-SEA fp32), fp32 on the CPU."""
    if config["precision"] != "auto":
        return config["precision"]
    return get_plugin(config["model"]).cuda_precision if on_cuda(config) else "fp32"


# keys that say where a run went or how it was watched, never what a checkpoint is
RUN_KEYS = ("test_only", "checkpoint", "data_root", "raw_root", "skip_missing_images", "observer_dir",
            "checkpoint_dir", "resume", "resume_from", "device", "progress", "num_workers", "seed", "gallery",
            "n_queries", "gallery_dir", "tensorboard", "verify_val_images")


# besides its architecture keys, what fine-tuning takes from a checkpoint's configuration
# (the weights would not fit another input size: a ViT's position embeddings)
FINE_TUNE_KEYS = ("image_size",)


def checkpoint_config_updates(config: dict, recorded: dict, given: set, path: str | None = None,
                              fine_tune: bool = False) -> tuple[dict, list[str]]:
    """A run of a project checkpoint ``path`` (default: config["checkpoint"]): the keys it
    records for every key not ``given`` on the command line. To evaluate it (test_only,
    the gallery, an ensemble): its architecture, tokenizer and data settings; to fine-tune
    it (``fine_tune``): its architecture keys and input size only (the recipe is the run's).

    A given key that changes the architecture against the recorded value is refused in
    one line naming both values; one that changes the scoring (a plug-in's
    ``scoring_keys``: HAT's direction, lambda_softmax) is allowed with a note for the run's
    output; other given keys (batch sizes, protocol) simply win. Returns (updates, notes)."""
    path = path or config["checkpoint"]
    purpose = "fine-tune" if fine_tune else "evaluate"
    if recorded.get("model", config["model"]) != config["model"]:
        if "model" in given:
            raise ConfigProblem(f"model={config['model']!r} conflicts with checkpoint={path}, a model="
                                f"{recorded['model']!r} checkpoint; leave model out to {purpose} it")
        raise ConfigProblem(f"checkpoint={path} is a model={recorded['model']!r} checkpoint: add "
                            f"`with {recorded['model']}` (its other settings are taken from the checkpoint)")
    plugin = get_plugin(config["model"])
    taken = (*plugin.architecture_keys, *FINE_TUNE_KEYS) if fine_tune else None
    updates, notes = {}, []
    for key, value in recorded.items():
        if key in RUN_KEYS or key not in config or config[key] == value or (taken and key not in taken):
            continue
        if key not in given:
            updates[key] = value
        elif key in plugin.architecture_keys:
            raise ConfigProblem(f"{key}={config[key]!r} conflicts with checkpoint={path}, trained with "
                                f"{key}={value!r}; leave {key} out to {purpose} the checkpoint as trained")
        elif key in plugin.scoring_keys and not fine_tune:
            notes.append(f"note: scoring checkpoint={path} with {key}={config[key]!r}; it was trained with "
                         f"{key}={value!r}")
    return updates, notes


def check_one_architecture(model: str, members: list[tuple[str, dict]]) -> None:
    """The project checkpoints of an ensemble ((path, recorded configuration) each) share
    one architecture: each is loaded into the same model."""
    keys = get_plugin(model).architecture_keys
    (first, reference), *others = members
    for path, recorded in others:
        for key in keys:
            if key in reference and key in recorded and recorded[key] != reference[key]:
                raise ConfigProblem(f"ensemble: {path} has {key}={recorded[key]!r}, {first} {key}="
                                    f"{reference[key]!r}; the members of an ensemble share one architecture "
                                    f"(evaluate them one by one with checkpoint=)")


def check_offline_backbones(config) -> None:
    """The pretrained backbones and the tokenizer a run needs, where they are neither local
    files nor in the HF cache, can be downloaded. Offline (HF_HUB_OFFLINE=1, or one request
    to the hub without an answer, which also turns the hub's offline mode on) raises one
    ConfigProblem naming every missing one with every way out: local files, random
    weights, the packaged MiniLM, demo_recipe=True. No request when nothing is missing."""
    from hat.backbones import hub_unreachable, image_need, offline_message, text_files_missing, text_need, \
        timm_weights_cached

    training = not config.get("test_only")
    # test_only and fine-tuning from checkpoint= build the architecture alone (run.py):
    # every weight comes from the checkpoint, only the tokenizer is needed
    weights = training and not config.get("checkpoint")
    needs = []
    image = config.get("image_backbone")
    if weights and image and config.get("image_pretrained") and not config.get("image_weights") \
            and timm_weights_cached(image) is False:
        needs.append(image_need(image))
    text = config.get("text_backbone")
    if text:  # every model tokenizes with it; the model's own keys say whether it is also a backbone
        missing = text_files_missing(text, weights=weights and bool(config.get("text_pretrained")),
                                     architecture="text_pretrained" in config)
        if missing:
            needs.append(text_need(text, missing, level_pairs="level_pairs" in config, training=training))
    if not needs:
        return
    reason = hub_unreachable(needs[0][0].split("=", 1)[1])
    if reason:
        raise ConfigProblem(offline_message(needs, reason, demo=weights and not config.get("demo_recipe")))
