"""The edges where a run used to lose work or say something wrong: the "last good"
checkpoint after a divergence, checks that used to wait for the end of an epoch, resume
across checkpoint_dir, a stop signal while a checkpoint is read, hand-made checkpoint
dicts, and the record (cout.txt, run.json) of runs that fail or are interrupted."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, only_run_folder, run_folders
from tests.toy_model import ToyPlugin, toy_config

TOY = {"demo_train_images": 48, "demo_eval_images": 12, "eval_batch_size": 16, "progress": False}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from datamodules.demo import ensure_demo_data

    return ensure_demo_data(str(tmp_path_factory.mktemp("demo")), TOY["demo_train_images"],
                            TOY["demo_eval_images"])


def nan_config(model, demo_recipe):
    if model == "toynan":
        toy_config("toy", demo_recipe)  # (a Sacred scope cannot call another: the keys are repeated)
        toy_dim = 16
        toy_loss = "infonce"
        toy_temperature = 0.1
        learning_rate = 3e-3
        per_gpu_batchsize = 16
        max_epoch = 1
        image_transform = "plain"
        nan_at_step = 5  # the loss of this optimizer step (1-based) is NaN


class NaNAtStep(ToyPlugin):
    """The toy model whose loss is NaN at optimizer step ``nan_at_step`` (a bad batch,
    as far as the loop can tell: it cannot know that the weights are fine)."""

    name = "toynan"
    config = staticmethod(nan_config)
    calls = 0

    def loss(self, network, model, batch, epoch, gather=None):
        NaNAtStep.calls += 1
        losses = super().loss(network, model, batch, epoch, gather)
        if NaNAtStep.calls == self.c["nan_at_step"]:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def run_toynan(data_root, tmp_path, **updates):
    from hat.plugins import register, unregister
    from run import UsageError, ex

    NaNAtStep.calls = 0
    register(NaNAtStep)
    try:
        with pytest.raises(UsageError) as error:
            ex.run(named_configs=["demo"], config_updates=dict(
                TOY, model="toynan", data_root=data_root, observer_dir=str(tmp_path / "runs"), **updates))
    finally:
        unregister("toynan")
    return str(error.value)


@pytest.mark.parametrize("every", [2, 3])
def test_last_good_checkpoint_is_one_written_before_the_step_that_diverged(data_root, tmp_path, every):
    message = run_toynan(data_root, tmp_path, checkpoint_every_steps=every)
    last = only_run_folder(tmp_path / "runs") / "last.ckpt"  # the run raised: no Run to ask
    saved = torch.load(last, weights_only=True)["step"]
    assert message.startswith("non-finite loss (nan) at epoch 0, step 4; nothing was written; ")
    if every == 2:  # last.ckpt holds the weights after step 4, which gave the NaN loss of step 5
        assert saved == 4
        assert (f"no good checkpoint: none was written before the step that diverged ({last} holds the "
                f"diverged weights: do not resume from it)") in message
    else:  # written after step 3: step 4 ran on its weights with a finite loss
        assert saved == 3
        assert f"last good checkpoint: {last}, resume_from it; lower learning_rate" in message
    assert saved == torch.load(last, weights_only=True)["step"]  # nothing written after the NaN


def test_weights_that_became_non_finite_are_not_written(data_root, tmp_path):
    """A finite loss but an update that overflowed: the checkpoint due is not written."""
    from hat.plugins import register, unregister
    from run import UsageError, ex

    class Overflow(NaNAtStep):
        def optimizer(self, model):
            optimizer = super().optimizer(model)

            def overflow(optimizer, args, kwargs):  # the third update overflows one weight
                NaNAtStep.calls += 1
                if NaNAtStep.calls == 3:
                    with torch.no_grad():
                        model.text_proj.weight[0, 0] = float("inf")

            optimizer.register_step_post_hook(overflow)
            return optimizer

        def loss(self, network, model, batch, epoch, gather=None):
            return ToyPlugin.loss(self, network, model, batch, epoch, gather)

    NaNAtStep.calls = 0
    register(Overflow)
    try:
        with pytest.raises(UsageError) as error:
            ex.run(named_configs=["demo"], config_updates=dict(
                TOY, model="toynan", data_root=data_root, observer_dir=str(tmp_path / "runs"),
                checkpoint_every_steps=1, nan_at_step=1000))
    finally:
        unregister("toynan")
    last = only_run_folder(tmp_path / "runs") / "last.ckpt"  # the run raised: no Run to ask
    state = torch.load(last, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert str(error.value) == (
        f"the weights became NaN/infinite (1 parameter(s), first: text_proj.weight) by epoch 0, step 3; nothing "
        f"was written; last good checkpoint: {last}, resume_from it; lower learning_rate")


@pytest.mark.parametrize("updates, message", [
    ({"max_text_len": 1}, "max_text_len=1 is not valid; allowed: an integer >= 3"),
    ({"max_text_len": 2}, "max_text_len=2 is not valid; allowed: an integer >= 3"),
    ({"checkpoint_every_steps": -1}, "checkpoint_every_steps=-1 is not valid; allowed: a non-negative integer"),
    ({"log_every_steps": -2}, "log_every_steps=-2 is not valid; allowed: a non-negative integer"),
    ({"lr_step_epochs": 0}, "lr_step_epochs=0 is not valid; allowed: a positive integer (StepLR's step"),
    ({"image_tile": 0}, "image_tile=0 is not valid; allowed: None or a positive integer"),
    ({"caption_tile": -4}, "caption_tile=-4 is not valid; allowed: None or a positive integer"),
    ({"demo_eval_images": 0}, "demo_eval_images=0 is not valid; allowed: a positive integer"),
    ({"demo_train_images": 0}, "demo_train_images=0 is not valid; allowed: a positive integer"),
    ({"learning_rate": -1}, "learning_rate=-1 is not valid; allowed: a number >= 0"),
    ({"learning_rate": "abc"}, "learning_rate='abc' is not valid; allowed: a number >= 0"),
    ({"num_workers": -1}, "num_workers=-1 is not valid; allowed: a non-negative integer"),
    ({"image_size": 0}, "image_size=0 is not valid; allowed: a positive integer"),
    ({"seed": "abc"}, "seed='abc' is not valid; allowed: an integer"),
    ({"level_pairs": []}, "level_pairs=[] is not valid; allowed: a non-empty list of [image stage, text layer]"),
    ({"lr_gamma": 0}, "lr_gamma=0 is not valid; allowed: a number > 0"),
    ({"verify_val_images": "yes"}, "verify_val_images='yes' is not valid; allowed: None"),
])
def test_values_that_failed_late_are_refused_before_any_work(data_root, updates, message):
    """Each of these used to pass the checks and fail later (after an epoch, or deep in a
    library with a traceback), or to run something else than asked (max_text_len=1 kept
    whole captions, checkpoint_every_steps=-1 saved at every step)."""
    from hat.defaults import default_config
    from run import UsageError, validate_config

    with pytest.raises(UsageError) as error:
        validate_config(default_config("hat", "demo", data_root=data_root, **updates))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_refused_value_exits_2_in_one_line_before_any_work(data_root):
    proc = subprocess.run([sys.executable, "run.py", "with", "demo", f"data_root={data_root}", "-u",
                           "max_text_len=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "Error" in line] == [
        "ConfigError: max_text_len=1 is not valid; allowed: an integer >= 3 (tokens with [CLS] and [SEP]: 3 keeps "
        "one word piece)"]


def test_multisea_values_are_checked_before_any_work():
    from hat.defaults import default_config
    from run import UsageError, validate_config

    for key, value, allowed in (("encoder_lr", -1e-6, "a number >= 0"), ("warmup_ratio", 1.5, "a number in [0, 1]"),
                                ("adam_betas", [0.9], "two numbers in [0, 1)"), ("itm_layers", [], "AFormer layers"),
                                ("temp_init", 0, "a number > 0")):
        config = default_config("multisea", "demo", **{key: value})
        with pytest.raises(UsageError, match=r"^" + key + r"=.* is not valid; allowed: .*" + allowed.replace(
                "[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            validate_config(config)


def copy_demo(data_root, root, edit_split=None, column=None, edit=None, prefix="demo_caption_"):
    """The demo's arrow files copied into ``root`` (named ``prefix<split>.arrow``), with
    ``edit(values)`` applied to ``column`` of ``edit_split``."""
    import pyarrow as pa

    import shutil

    os.makedirs(root, exist_ok=True)
    if prefix == "demo_caption_":  # the demo's metadata: the set is not generated again
        shutil.copyfile(os.path.join(data_root, "demo_meta.json"), os.path.join(root, "demo_meta.json"))
    for split in ("train", "val", "test"):
        table = pa.ipc.open_file(os.path.join(data_root, f"demo_caption_{split}.arrow")).read_all()
        if split == edit_split:
            values = table.column(column).to_pylist()
            edit(values)
            table = table.set_column(table.schema.get_field_index(column), column,
                                     pa.array(values, type=table.schema.field(column).type))
        with pa.OSFile(os.path.join(root, f"{prefix}{split}.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    return str(root)


def truncate_last(images):
    images[-1] = images[-1][:40]  # a truncated JPEG


def test_a_bad_validation_image_stops_the_run_before_the_first_step(data_root, tmp_path):
    from run import UsageError, ex
    from tests.toy_model import registered_toy

    root = copy_demo(data_root, tmp_path / "broken", "val", "image", truncate_last)
    with registered_toy():
        with pytest.raises(UsageError, match=r"^image \S+ in .*demo_caption_val.arrow does not decode") as error:
            ex.run(named_configs=["demo"], config_updates=dict(TOY, model="toy", data_root=root,
                                                               observer_dir=str(tmp_path / "runs")))
    run_dir = only_run_folder(tmp_path / "runs")  # the run raised: no Run to ask
    assert not (run_dir / "last.ckpt").exists()  # no step ran: nothing to lose
    cout = (run_dir / "cout.txt").read_text()
    assert "training on" not in cout and cout.rstrip().endswith(f"UsageError: {error.value}")
    assert json.loads((run_dir / "run.json").read_text())["message"] == f"UsageError: {error.value}"


def test_resume_finds_a_run_whose_checkpoints_went_to_checkpoint_dir(data_root, tmp_path):
    from hat.run_folders import find_resumable, resume_checkpoint

    config = {"model": "hat", "seed": 0, "observer_dir": str(tmp_path / "runs"), "checkpoint_dir": None,
              "exp_name": "hat_demo", "resume": True}
    recorded = dict(config, checkpoint_dir=str(tmp_path / "ckpt"), resume=False)
    run = tmp_path / "runs" / "3"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(recorded))
    (run / "info.json").write_text(json.dumps({"checkpoint": str(tmp_path / "ckpt" / "3" / "best.ckpt")}))
    (tmp_path / "ckpt" / "3").mkdir(parents=True)
    (tmp_path / "ckpt" / "3" / "last.ckpt").write_bytes(b"x")
    other = tmp_path / "runs" / "4"  # another configuration
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(recorded, seed=1)))
    (other / "last.ckpt").write_bytes(b"x")
    assert find_resumable(config) == (str(run), str(tmp_path / "ckpt" / "3" / "last.ckpt"))
    last, info = resume_checkpoint(config)
    assert last == str(tmp_path / "ckpt" / "3" / "last.ckpt") and info["resumed_run"] == 3


def test_a_stop_signal_while_a_checkpoint_is_read_is_a_stop(tmp_path, monkeypatch):
    from hat import checkpoint
    from hat.loop import StopRequested

    path = tmp_path / "best.ckpt"
    path.write_bytes(b"not empty")

    def interrupted(*args, **kwargs):
        raise StopRequested("SIGTERM: stopped at once; nothing half-written was left")

    monkeypatch.setattr(checkpoint.torch, "load", interrupted)
    with pytest.raises(StopRequested):  # not "cannot be read (...); is the file complete?"
        checkpoint.read_checkpoint_file(str(path))


def test_sigterm_during_test_only_is_interrupted_with_the_message_in_the_record(data_root, tmp_path):
    """A test_only run stopped at once by SIGTERM: INTERRUPTED, the message in run.json and
    at the end of cout.txt."""
    from hat.checkpoint import save_checkpoint
    from hat.defaults import default_config
    from hat.plugins import get_plugin

    config = default_config("hat", "demo", data_root=data_root, swin_depths=[1, 1, 1, 1], embed_dim=32,
                            **TOY)
    checkpoint = save_checkpoint(str(tmp_path / "best.ckpt"), get_plugin("hat")(config).build(pretrained=True),
                                 config=config)
    proc = subprocess.Popen([sys.executable, "run.py", "with", f"checkpoint={checkpoint}", "test_only=True",
                             f"observer_dir={tmp_path / 'runs'}", "eval_batch_size=1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    deadline = time.time() + 120
    while not any((folder / "run.json").exists() for folder in run_folders(runs)) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    run_dir = only_run_folder(runs)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "INTERRUPTED", stderr[-2000:]
    assert record["message"].startswith("TrainingInterrupted: SIGTERM: stopped at once")
    assert (run_dir / "cout.txt").read_text().rstrip().endswith(record["message"])


def test_hand_made_checkpoint_dicts_are_one_line_errors(tmp_path):
    from hat.checkpoint import CheckpointError, load_checkpoint, load_model_weights, recorded_config

    model = torch.nn.Linear(2, 2)
    no_model = tmp_path / "no_model.ckpt"
    torch.save({"format": "hat-toolkit", "version": 1, "config": {"model": "hat"}}, no_model)
    text_config = tmp_path / "text_config.ckpt"
    torch.save({"format": "hat-toolkit", "version": 1, "model": model.state_dict(), "config": "hat"}, text_config)
    with pytest.raises(CheckpointError, match=r"with no 'model' \(it must be a state dict of tensors\)"):
        load_model_weights(model, str(no_model))
    with pytest.raises(CheckpointError, match=r"with no 'model'"):
        load_checkpoint(str(no_model))
    with pytest.raises(CheckpointError, match=r"with a str as its 'config' \(it must be a dict\)"):
        load_model_weights(model, str(text_config))
    with pytest.raises(CheckpointError, match=r"whose 'config' is a str, not a dict"):
        recorded_config(str(text_config))
    proc = subprocess.run([sys.executable, "run.py", "with", "demo", "test_only=True", f"checkpoint={text_config}",
                           "-u"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "Error" in line] == [
        f"ConfigError: checkpoint={text_config} is a hat-toolkit checkpoint whose 'config' is a str, not a dict: "
        f"the file was not written by this toolkit's save_checkpoint; use a checkpoint a run wrote"]


def test_an_image_without_captions_is_refused_with_a_fix_that_works(data_root, tmp_path):
    """A val/test image without captions: captions_per_image=None used to be suggested,
    and then failed in the ranking with a traceback."""
    from run import UsageError, validate_config

    def no_caption(captions):
        captions[2] = []

    root = copy_demo(data_root, tmp_path / "data", "test", "caption", no_caption, prefix="f30k_caption_karpathy_")
    for cpi in (5, None):
        config = {**__import__("hat.defaults").defaults.default_config("hat", "f30k"), "data_root": root,
                  "captions_per_image": cpi}
        with pytest.raises(UsageError, match=r"^image \S+ in .*f30k_caption_karpathy_test.arrow has no caption: "
                                             r"every image of a val/test split needs at least one"):
            validate_config(config)
