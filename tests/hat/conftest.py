"""Tiny real demo runs shared by the tests of tests/hat (each is trained once per session):
the run browser, the gallery, the curves and hat.load_model all look at the same runs."""
import pytest
import torch

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
    return run, str(tmp / "runs" / str(run._id) / "best.ckpt"), str(tmp / "data")


@pytest.fixture(scope="session")
def hat_run(tmp_path_factory):
    """HAT, direction t2i, one epoch, the per-step loss logged and TensorBoard on."""
    return train(tmp_path_factory.mktemp("hat"), ["demo", "t2i"], HAT_TINY)


@pytest.fixture(scope="session")
def multisea_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("multisea"), ["multisea", "demo"], MULTISEA_TINY)


@pytest.fixture(scope="session")
def browse_runs(tmp_path_factory):
    """An observer directory: run 1 trains HAT (i2t, COMPLETED); run 2 tests its checkpoint
    with direction=t2i (COMPLETED); run 3 tests a copy whose weights hold a NaN (FAILED)."""
    from hat.checkpoint import load_checkpoint
    from run import UsageError, ex

    tmp = tmp_path_factory.mktemp("browse")
    common = {"data_root": str(tmp / "data"), "observer_dir": str(tmp / "runs")}
    trained = ex.run(named_configs=["demo"], config_updates=dict(BROWSE_TINY, **common))
    best = tmp / "runs" / "1" / "best.ckpt"
    ex.run(named_configs=["demo"], config_updates=dict(BROWSE_TINY, **common, test_only=True,
                                                         checkpoint=str(best), direction="t2i"))
    state = load_checkpoint(str(best))
    state["model"]["text_proj.0.bias"][0] = float("nan")
    torch.save(state, tmp / "nan.ckpt")
    with pytest.raises(UsageError):
        ex.run(named_configs=["demo"], config_updates=dict(BROWSE_TINY, **common, test_only=True,
                                                             checkpoint=str(tmp / "nan.ckpt")))
    return tmp / "runs", trained
