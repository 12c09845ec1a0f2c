"""Tiny real demo runs shared by the tests of tests/hat (each is trained once per session):
the run browser, the gallery, the curves and hat.load_model all look at the same runs."""
import pytest
import torch

from tests.conftest import only_run_folder, run_folder

BROWSE_TINY = {"demo_train_images": 48, "demo_eval_images": 12, "max_epoch": 2, "per_gpu_batchsize": 16,
               "eval_batch_size": 16, "progress": False, "swin_depths": [1, 1, 1, 1], "embed_dim": 32}
HAT_TINY = {"demo_train_images": 48, "demo_eval_images": 12, "max_epoch": 1, "per_gpu_batchsize": 16,
            "eval_batch_size": 16, "progress": False, "swin_depths": [1, 1, 1, 1], "embed_dim": 32,
            "log_every_steps": 1, "tensorboard": True}
MULTISEA_TINY = {"demo_train_images": 48, "demo_eval_images": 12, "max_epoch": 1, "batch_size": 16,
                 "per_gpu_batchsize": 8, "eval_batch_size": 16, "progress": False, "vision_depth": 2,
                 "embed_dim": 32, "fusion_heads": 2, "fusion_layers": 2, "queue_size": 32, "top_k": 8,
                 "image_backbone_kwargs": {"patch_size": 16, "embed_dim": 32, "num_heads": 2}}


def train(tmp, named, updates):
    from run import ex

    run = ex.run(named_configs=named, config_updates=dict(updates, data_root=str(tmp / "data"),
                                                          observer_dir=str(tmp / "runs")))
    assert run.status == "COMPLETED"
    return run, str(run_folder(run) / "best.ckpt"), str(tmp / "data")


def runner_scores(checkpoint: str, data_root: str):
    """The test split's score matrices as the runner ranks them (run.eval_data, the plug-in's
    evaluate), with the test images and protocol captions in the runner's order."""
    from datamodules import open_split
    from hat.backbones import load_tokenizer
    from hat.checkpoint import load_checkpoint
    from hat.plugins import EvalOptions, get_plugin
    from run import eval_data

    c = load_checkpoint(checkpoint)["config"]
    plugin = get_plugin(c["model"])(c)
    tokenizer = load_tokenizer(c["text_backbone"])
    options = EvalOptions(split="test", checkpoints=[checkpoint], keep_scores=True)
    result = plugin.evaluate(plugin.build(pretrained=False), eval_data(c, data_root, "test", tokenizer, plugin.pad_to),
                             torch.device("cpu"), options)
    split = open_split(data_root, "demo", "test")
    images = [split.image(i) for i in range(len(split))]
    captions = [caption for i in range(len(split)) for caption in split.captions(i)[:5]]
    return result.metrics, result.scores, images, captions


@pytest.fixture(scope="session")
def hat_run(tmp_path_factory):
    """HAT, direction t2i, one epoch, the per-step loss logged and TensorBoard on."""
    return train(tmp_path_factory.mktemp("hat"), ["demo", "t2i"], HAT_TINY)


@pytest.fixture(scope="session")
def multisea_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("multisea"), ["multisea", "demo"], MULTISEA_TINY)


@pytest.fixture(scope="session")
def browse_runs(tmp_path_factory):
    """An observer directory of three runs: the first trains HAT (i2t, COMPLETED); the second
    tests its checkpoint with direction=t2i (COMPLETED); the third tests a copy whose weights
    hold a NaN (FAILED). (the directory, the first run's Run, the three runs' ids: their
    folders' names, in the order they ran)"""
    from hat.checkpoint import load_checkpoint
    from run import UsageError, ex

    tmp = tmp_path_factory.mktemp("browse")
    common = {"data_root": str(tmp / "data"), "observer_dir": str(tmp / "runs")}
    trained = ex.run(named_configs=["demo"], config_updates=dict(BROWSE_TINY, **common))
    best = run_folder(trained) / "best.ckpt"
    tested = ex.run(named_configs=["demo"], config_updates=dict(BROWSE_TINY, **common, test_only=True,
                                                                  checkpoint=str(best), direction="t2i"))
    state = load_checkpoint(str(best))
    state["model"]["text_proj.0.bias"][0] = float("nan")
    torch.save(state, tmp / "nan.ckpt")
    with pytest.raises(UsageError):
        ex.run(named_configs=["demo"], config_updates=dict(BROWSE_TINY, **common, test_only=True,
                                                             checkpoint=str(tmp / "nan.ckpt")))
    folders = [run_folder(trained), run_folder(tested)]
    folders.append(only_run_folder(tmp / "runs", besides=folders))  # the run that raised
    return tmp / "runs", trained, [folder.name for folder in folders]
