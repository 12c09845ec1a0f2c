"""Checkpoint I/O that never reports a wrong result and never loses the previous file:
empty files, directories, NaN weights, a full disk, a checkpoint of the other model."""
import errno
import os

import pytest
import torch

from hat.checkpoint import (CheckpointError, load_checkpoint, load_model_weights, load_training_state,
                            read_checkpoint_file, save_checkpoint)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_empty_file_and_directory_are_one_line_errors(tmp_path):
    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        read_checkpoint_file(str(empty))
    assert one_line(error) == (f"checkpoint={empty} is empty (0 bytes): its write never completed; use "
                               f"another checkpoint (e.g. best.ckpt or an earlier run's last.ckpt)")
    with pytest.raises(CheckpointError) as error:
        read_checkpoint_file(str(tmp_path))
    assert one_line(error).startswith(f"checkpoint={tmp_path} is a directory; pass the path of a .ckpt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused(tmp_path, bad):
    model = Tiny()
    path = str(tmp_path / "best.ckpt")
    with torch.no_grad():
        model.linear.bias[1] = bad
    save_checkpoint(path, model, config={"model": "hat"})
    with pytest.raises(CheckpointError) as error:
        load_model_weights(Tiny(), path)
    assert one_line(error) == (f"checkpoint={path} holds NaN/infinite weights in 1 parameter(s) (first: "
                               f"linear.bias): the run that wrote it diverged or the file is corrupted; "
                               f"use an earlier checkpoint")
    with torch.no_grad():
        model.linear.bias[1] = 0.5
    save_checkpoint(path, model, config={"model": "hat"})
    fresh = Tiny()
    assert load_model_weights(fresh, path)["format"] == "hat-toolkit"
    assert torch.equal(fresh.linear.weight, model.linear.weight)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = Tiny()
    path = tmp_path / "last.ckpt"
    save_checkpoint(str(path), model, epoch=1)
    before = path.read_bytes()

    def no_space(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(str(path), model, epoch=2)
    assert one_line(error) == (f"could not write checkpoint {path} (OSError: [Errno 28] No space left on "
                               f"device); the file there before (if any) is unchanged: free disk space "
                               f"there or set checkpoint_dir=/a/folder/with/space")
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(str(path))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary left behind


def test_resuming_from_a_checkpoint_of_the_other_model_is_one_line(tmp_path):
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    path = str(tmp_path / "last.ckpt")
    save_checkpoint(path, model, optimizer, scheduler, epoch=1, config={"model": "multisea"})
    with pytest.raises(CheckpointError) as error:
        load_training_state(path, model, optimizer, scheduler, "hat")
    assert one_line(error) == (f"resume_from={path} is a checkpoint of model=multisea, this run is "
                               f"model=hat; resume with the configuration it was written with")
    other = torch.nn.Linear(3, 4)  # same model kind, another architecture
    other_optimizer = torch.optim.Adam(other.parameters())
    with pytest.raises(CheckpointError) as error:
        load_training_state(path, other, other_optimizer, torch.optim.lr_scheduler.StepLR(other_optimizer, 1),
                            "multisea")
    assert one_line(error).startswith(f"resume_from={path}: its model state does not fit this run (")
    state = load_training_state(path, Tiny(), torch.optim.Adam(Tiny().parameters()), scheduler, "multisea")
    assert state["epoch"] == 1
