"""What a new user meets first: a data set smaller than one batch, a device the machine
lacks, the noise at the start of every command, what a run leaves in the checkout."""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, only_run_folder, run_folder


@pytest.mark.parametrize("model, extra, message", [
    ("hat", [], "the training split has 50 captions, fewer than one batch of 64: set per_gpu_batchsize to at most "
                "50, or train on more data (demo_train_images)"),
    ("multisea", ["per_gpu_batchsize=16"], "the training split has 10 images, fewer than one batch of 64: set "
                                           "batch_size (and per_gpu_batchsize) to at most 10, or train on more "
                                           "data (demo_train_images)"),
])
def test_a_training_set_smaller_than_one_batch_is_one_line_naming_the_keys(tmp_path, model, extra, message):
    proc = subprocess.run([sys.executable, "run.py", "-u", "with", "demo", f"model={model}", "demo_train_images=10",
                           "demo_eval_images=4", f"data_root={tmp_path / 'data'}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "Error" in line] == [f"UsageError: {message}"]


def test_load_model_on_a_device_this_machine_lacks_is_one_line(tmp_path):
    import hat

    if torch.cuda.is_available():
        device, message = f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    else:
        device, message = "cuda", "device=cuda: this machine has no usable CUDA device"
    with pytest.raises(ValueError, match=message):
        hat.load_model(str(tmp_path / "never-read.ckpt"), device=device)
    with pytest.raises(ValueError, match=r"^device='gpu' is not valid; allowed: cpu, cuda or cuda:N$"):
        hat.load_model(str(tmp_path / "never-read.ckpt"), device="gpu")


def test_commands_start_without_warnings_and_with_workers_the_machine_has():
    proc = subprocess.run([sys.executable, "run.py", "print_config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pkg_resources" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-2000:]
    from hat.defaults import default_config

    assert default_config("hat", "f30k")["num_workers"] == min(8, os.cpu_count() or 1)
    assert default_config("hat", "demo")["num_workers"] == 0


def test_what_runs_write_is_not_tracked_by_git():
    if subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    paths = ["runs/1/best.ckpt", "features/best-test-0123.features.pt", "checkpoints/hat_f30k/1/last.ckpt",
             "sub/runs/2/cout.txt", "elsewhere.ckpt"]
    ignored = subprocess.run(["git", "-C", ROOT, "check-ignore", *paths], capture_output=True, text=True).stdout
    assert ignored.split() == paths
    kept = subprocess.run(["git", "-C", ROOT, "check-ignore", "hat/runs.py", "tests/data/hat_state_dict.txt"],
                          capture_output=True, text=True).stdout
    assert kept == ""


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Untrained tiny demo checkpoints (HAT twice, seeds 0 and 1; Multi-SEA) and a data
    root holding the demo's arrow files under both the demo's and Flickr30K's names."""
    import shutil

    from datamodules.demo import ensure_demo_data
    from hat.checkpoint import save_checkpoint
    from hat.defaults import default_config
    from hat.plugins import get_plugin

    folder = tmp_path_factory.mktemp("tiny")
    root = ensure_demo_data(str(folder / "data"), 48, 12)
    for split in ("train", "val", "test"):
        shutil.copyfile(os.path.join(root, f"demo_caption_{split}.arrow"),
                        os.path.join(root, f"f30k_caption_karpathy_{split}.arrow"))
    paths = {}
    for name, model, seed, extra in (("hat0", "hat", 0, {"swin_depths": [1, 1, 1, 1], "embed_dim": 32}),
                                     ("hat1", "hat", 1, {"swin_depths": [1, 1, 1, 1], "embed_dim": 32}),
                                     ("multisea", "multisea", 0, {})):
        config = default_config(model, "demo", data_root=root, demo_train_images=48, demo_eval_images=12, **extra)
        torch.manual_seed(seed)
        network = get_plugin(model)(config).build(pretrained=True)
        paths[name] = save_checkpoint(str(folder / f"{name}.ckpt"), network, config=config)
    return paths, root


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_fine_tuning_a_checkpoint_takes_its_architecture_and_downloads_nothing(tiny_checkpoints, tmp_path):
    """A demo checkpoint fine-tuned with the Flickr30K recipe: its architecture (tiny Swin,
    MiniLM, levels, 64 px) comes from the checkpoint, the recipe (epochs, batch, lr) from
    the run; no backbone is downloaded (offline here)."""
    import json

    paths, root = tiny_checkpoints
    proc = cli("with", f"checkpoint={paths['hat0']}", f"data_root={root}", f"observer_dir={tmp_path / 'runs'}",
               "max_epoch=1", "progress=False", "eval_batch_size=16", "gallery=False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((only_run_folder(tmp_path / "runs") / "config.json").read_text())
    assert (config["swin_depths"], config["embed_dim"], config["text_backbone"], config["image_size"]) == (
        [1, 1, 1, 1], 32, "packaged-minilm", 64)
    assert (config["per_gpu_batchsize"], config["learning_rate"], config["max_epoch"]) == (58, 1e-4, 1)
    refused = cli("with", f"checkpoint={paths['hat0']}", f"data_root={root}", "embed_dim=64", "-u")
    assert refused.returncode == 2
    assert f"ConfigError: embed_dim=64 conflicts with checkpoint={paths['hat0']}, trained with embed_dim=32; " \
           f"leave embed_dim out to fine-tune the checkpoint as trained" in refused.stderr


def test_an_ensemble_takes_its_members_configuration(tiny_checkpoints, tmp_path):
    paths, root = tiny_checkpoints
    members = f"ensemble=['{paths['hat0']}','{paths['hat1']}']"
    proc = cli("with", "test_only=True", members, f"data_root={root}", "-u", "eval_batch_size=16", "gallery=False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "testing ensemble of 2 on the test split of demo" in proc.stdout


def test_ensemble_members_of_two_architectures_are_one_line(tiny_checkpoints, tmp_path):
    from hat.checks import check_one_architecture
    from hat.plugins import ConfigProblem

    with pytest.raises(ConfigProblem, match=r"^ensemble: b.ckpt has embed_dim=64, a.ckpt embed_dim=32; the members "
                                            r"of an ensemble share one architecture"):
        check_one_architecture("hat", [("a.ckpt", {"embed_dim": 32}), ("b.ckpt", {"embed_dim": 64})])


def test_a_multisea_checkpoint_needs_no_with_multisea(tiny_checkpoints):
    from run import with_recorded_model

    paths, root = tiny_checkpoints
    argv = ["run.py", "with", "test_only=True", f"checkpoint={paths['multisea']}"]
    assert with_recorded_model(argv) == [*argv, "model=multisea"]
    assert with_recorded_model(["run.py", "with", "multisea", f"checkpoint={paths['multisea']}"]) == [
        "run.py", "with", "multisea", f"checkpoint={paths['multisea']}"]
    assert with_recorded_model(["run.py", "with", f"checkpoint={paths['hat0']}"]) == [
        "run.py", "with", f"checkpoint={paths['hat0']}"]
    proc = cli("with", "test_only=True", f"checkpoint={paths['multisea']}", f"data_root={root}", "-u",
               "eval_batch_size=16", "gallery=False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rsum" in proc.stdout and "Multi-SEA" not in proc.stderr


def test_best_and_last_of_the_same_epoch_are_one_file(tmp_path):
    """An epoch that improves writes best.ckpt and last.ckpt of one state: one file with
    two names; a later write of last.ckpt leaves best.ckpt as it was."""
    from hat.checkpoint import atomic_save, load_checkpoint
    from run import ex
    from tests.toy_model import registered_toy

    with registered_toy():
        run = ex.run(named_configs=["demo"], config_updates={
            "model": "toy", "data_root": str(tmp_path / "data"), "observer_dir": str(tmp_path / "runs"),
            "demo_train_images": 48, "demo_eval_images": 12, "eval_batch_size": 16, "progress": False})
    folder = run_folder(run)
    assert os.path.samefile(folder / "best.ckpt", folder / "last.ckpt")
    best = load_checkpoint(str(folder / "best.ckpt"))
    atomic_save({"format": "hat-toolkit", "model": {}, "config": {}}, str(folder / "last.ckpt"))
    assert not os.path.samefile(folder / "best.ckpt", folder / "last.ckpt")
    again = load_checkpoint(str(folder / "best.ckpt"))
    assert again["epoch"] == best["epoch"] and all(torch.equal(again["model"][k], v) for k, v in best["model"].items())
    assert not list(folder.glob("*.tmp-*"))


def test_prepare_data_and_print_config_say_nothing_misleading():
    proc = subprocess.run([sys.executable, "run.py", "prepare_data", "with", "dataset=f30k", "raw_root=/nonexistent",
                           "data_root=/nonexistent-out"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "No observers" not in proc.stderr and "raw_root=/nonexistent" in proc.stderr
    shown = subprocess.run([sys.executable, "run.py", "print_config", "with", "multisea"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    lines = {line.split("=")[0].strip(): line for line in shown.splitlines() if " = " in line}
    assert "Swin" not in lines["image_backbone"].replace("HAT: a Swin", "")  # no HAT-only comment on a shared key
    assert "Multi-SEA" in lines["learning_rate"] and "Multi-SEA" in lines["embed_dim"]


def test_a_demo_data_root_is_named_in_full(tmp_path, monkeypatch, capsys):
    from datamodules.demo import ensure_demo_data

    monkeypatch.chdir(tmp_path)
    ensure_demo_data("DATA", 4, 2)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"generating demo data (4 train, 2 val, 2 test images) in {tmp_path / 'DATA'} (data_root; "
                    f"leave it out to keep the demo data in the cache)")
