"""torchrun with two CPU processes (gloo) trains like one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, only_run_folder

TINY = ["demo_train_images=64", "demo_eval_images=8", "max_epoch=1", "batch_size=16",
        "eval_batch_size=16", "progress=False", "swin_depths=[1,1,1,1]",
        "embed_dim=32", "text_dropout=0.0", "log_every_steps=1", "num_workers=0",
        "learning_rate=2e-6"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from datamodules.demo import ensure_demo_data

    return ensure_demo_data(str(tmp_path_factory.mktemp("demo")), train_images=64, eval_images=8)


def _run(prefix, data_root, observer, per_gpu_batchsize):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*prefix, "run.py", "with", "demo", f"data_root={data_root}",
                           f"observer_dir={observer}", f"per_gpu_batchsize={per_gpu_batchsize}", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_folder(observer)  # only rank 0 records the run: one run folder
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = json.loads((run_dir / "run.json").read_text())["result"]
    assert proc.stdout.count("training on ") == 1  # rank 0 alone prints
    return metrics["train.step_loss"]["values"], result


def test_two_processes_match_one(data_root, tmp_path):
    # the same global batch of 16: one process runs it whole, two run 8 each (no accumulation)
    single_losses, single = _run([sys.executable], data_root, tmp_path / "single", 16)
    ddp_losses, ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2"], data_root, tmp_path / "ddp", 8)
    assert len(single_losses) == len(ddp_losses) == 20  # 320 captions / 16
    for a, b in zip(single_losses, ddp_losses):
        assert abs(a - b) <= 1e-4 * abs(a), [f"{abs(x - y) / x:.1e}" for x, y in zip(single_losses, ddp_losses)]
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert abs(single[key] - ddp[key]) <= 1.0, (single, ddp)


def _tiny_hat():
    import torch

    from hat.models.hat.model import build_hat

    torch.manual_seed(0)
    model = build_hat("swin_base_patch4_window7_224", "packaged-minilm", [[2, 2], [3, 4], [4, 6]],
                      embed_dim=32, image_size=64, image_pretrained=False, text_dropout=0.0,
                      image_backbone_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                                 window_size=4, drop_path_rate=0.0))
    model.set_backbones_trainable(image=True, text=False)
    return model


def _global_batch():
    import torch

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 64, 64, generator=generator)
    input_ids = torch.randint(1000, 2000, (8, 12), generator=generator)
    attention_mask = (torch.arange(12)[None] < torch.tensor([12, 5, 9, 12, 3, 7, 12, 8])[:, None]).long()
    return images, input_ids, attention_mask


def _ddp_worker(rank, world_size, port, out_path):
    import torch
    import torch.distributed as dist

    from hat.distributed import gather_padded
    from hat.models.hat.loss import vse_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = _tiny_hat()
    network = torch.nn.parallel.DistributedDataParallel(model)
    images, input_ids, attention_mask = _global_batch()
    local = slice(rank * 4, rank * 4 + 4)
    ids, mask = input_ids[local], attention_mask[local]
    longest = int(mask.sum(1).max())  # ranks pad to different lengths, as the collate does
    scores = network(images[local], ids[:, :longest], mask[:, :longest], gather=gather_padded)
    vse_loss(scores, 0.2, hardest_negative=True).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_path)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    """Features gathered with autograd + DDP's averaging give the full-batch gradient."""
    import socket

    import torch
    import torch.multiprocessing as mp

    from hat.models.hat.loss import vse_loss

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "grads.pt")), nprocs=2)
    ddp_grads = torch.load(tmp_path / "grads.pt")

    model = _tiny_hat()
    vse_loss(model(*_global_batch()), 0.2, hardest_negative=True).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert single.keys() == ddp_grads.keys() and len(single) > 10
    for name, grad in single.items():
        assert torch.allclose(ddp_grads[name], grad, rtol=1e-4, atol=1e-6), name


def _eval_data(n_images, n_captions):
    import torch

    from datamodules.datasets import collate_captions

    generator = torch.Generator().manual_seed(2)
    images = list(torch.randn(n_images, 3, 64, 64, generator=generator))
    lengths = torch.randint(3, 14, (n_captions,), generator=generator).tolist()
    captions = [torch.randint(1000, 2000, (n,), generator=generator).tolist() for n in lengths]
    image_loader = torch.utils.data.DataLoader(images, batch_size=2)
    caption_loader = torch.utils.data.DataLoader(captions, batch_size=3, collate_fn=collate_captions)
    return image_loader, caption_loader


def _score(n_images, n_captions):
    from hat.models.hat.evaluation import encode_features, level_similarities

    model = _tiny_hat().eval()
    features = encode_features(model, *_eval_data(n_images, n_captions), "cpu")
    return features, level_similarities(model, features)


def _sharded_eval_worker(rank, world_size, port, out_dir, sizes):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    for n_images, n_captions in sizes:
        torch.save(_score(n_images, n_captions), os.path.join(out_dir, f"{n_images}-{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def test_sharded_evaluation_equals_single_process(tmp_path):
    """Under torchrun each rank encodes and scores its share; every rank ends with the
    single-process features and matrices (uneven shares, and a rank with none)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    sizes = [(7, 11), (2, 4)]  # 3 ranks: 3+3+1 images; 1+1+0 images
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sharded_eval_worker, args=(3, port, str(tmp_path), sizes), nprocs=3)
    for n_images, n_captions in sizes:
        features, sims = _score(n_images, n_captions)
        for rank in range(3):
            ranked, ranked_sims = torch.load(tmp_path / f"{n_images}-{rank}.pt")
            assert torch.equal(ranked["lengths"], features["lengths"])
            # caption positions beyond a caption's length are padding (their values depend
            # on the batch it was encoded in): compare the real tokens only
            real = (torch.arange(features["captions"][0].shape[1])[None]
                    < features["lengths"][:, None])[..., None]
            pairs = (list(zip(ranked["images"], features["images"])) + list(zip(ranked_sims, sims))
                     + [(a * real, b * real) for a, b in zip(ranked["captions"], features["captions"])])
            assert len(pairs) == 9
            for ours, theirs in pairs:
                assert ours.shape == theirs.shape
                assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (n_images, rank)
