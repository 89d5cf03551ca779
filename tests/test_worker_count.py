"""The same training at any worker count: one seed at 1, 2 and 3 workers (torch.distributed on gloo, one process
per rank, as Ray Train runs them) takes the same steps on real CIFAR-10 images, because the data order and every
augmentation draw depend on an image's place in the global batch, and BatchNorm normalises over the global batch.

What may differ is float rounding: the ranks' sums are added in another order (the gradient all-reduce, the
BatchNorm statistics). In float32 that order alone moves the 4th step's loss by up to 1.4e-4 on some CPUs (AMD
EPYC, fp32 kernels) and 8e-6 on others (Intel Xeon), so a float32 tolerance would prove the equality on one CPU and
not another. The test trains in float64 (model, images, loss, BatchNorm statistics and every all-reduce), where
float order moves the results by about 1e-12: a tolerance 1e5 times tighter than float32's, and the same on any CPU.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_resnet.config import load_config
from ray_resnet.core.batches import epoch_batches
from ray_resnet.core.batchnorm import _pooled
from ray_resnet.core.datasets import load_cifar
from ray_resnet.core.loop import Hooks, build_training, fit, select_splits, steps_per_epoch

# 256 images in global batches of 64: 4 steps, each split 64 / 32+32 / 22+21+21 between the ranks; the recipe's
# warmup from lr 1e-5 (without it the first steps at lr 0.05 amplify a 1e-7 change of the weights to 2e-3 in the
# loss by step 4, and any two float orders drift apart that fast). perf.amp=fp32: no autocast (a CPU with AMX would
# train in bf16 under `auto`, whose rounding depends on each rank's batch shape); float64 is torch's default dtype.
SETS = ["data.train_subset=256", "data.test_subset=100", "optim.batch_size=64", "schedule.epochs=1",
        "schedule.warmup_epochs=1", "schedule.milestones=[]", "optim.lr=0.05", "perf.eval_batch_size=100",
        "perf.amp=fp32"]
# Per-step loss of the global batch, and every weight and BN buffer after the epoch, between 1 and 2 or 3 workers in
# float64. Float order alone moved them by <= 7.1e-15 and 1.0e-13 (AMD EPYC, torch 2.14; in float32 there: 1.3e-4
# and 6.9e-4); the tolerances leave 1e4 of room for other CPUs' kernels (float32's differed 16x between two CPUs). A
# real difference is far above them: per-worker BatchNorm moved the first loss by 2.8e-2 and the weights by 7.4e-2.
LOSS_TOL, WEIGHT_TOL = 1e-10, 1e-9


class StepLosses(Hooks):
    def __init__(self):
        self.losses: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def step_end(self, step, images, loss, lr):
        self.losses.append(loss.item())
        self.dtypes.add(loss.dtype)


def _rank(rank: int, world: int, port: int, root: str, sets: list[str], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # the model's parameters, the images and so the loss and collectives
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config(None, [f"data.root={root}", *SETS, *sets])
        arrays = {}
        for split in ("train", "test"):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = load_cifar(root, split)
        data = select_splits(cfg, arrays)
        training = build_training(cfg, torch.device("cpu"), steps_per_epoch(cfg, len(data.train_index), world), world,
                                  wrap=torch.nn.parallel.DistributedDataParallel)
        losses = StepLosses()
        fit(cfg, training, data, rank=rank, world=world, hooks=[losses])
        assert losses.dtypes == {torch.float64}, losses.dtypes  # nothing on the way fell back to float32
        shares = [len(s.indices) for s in epoch_batches(len(data.train_index), 64, world, rank, 0, cfg.seed)]
        out[rank] = {"losses": losses.losses, "shares": shares,
                     "state": {k: v.clone() for k, v in training.core.state_dict().items()}}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(world: int, root, *sets: str) -> tuple[list[float], dict]:
    """(per-step loss of the global batch, rank 0's state dict after one epoch) of `world` ranks; every rank's state
    is rank 0's (weights by DDP, BN buffers by the broadcast before evaluation)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(world, _free_port(), str(root), list(sets), out), nprocs=world)
        ranks = [out[r] for r in range(world)]
    per_step = zip(*[[loss * n for loss, n in zip(r["losses"], r["shares"])] for r in ranks])
    totals = [sum(n) for n in zip(*[r["shares"] for r in ranks])]
    assert all(_max_diff(r["state"], ranks[0]["state"]) == 0 for r in ranks)
    return [sum(weighted) / total for weighted, total in zip(per_step, totals)], ranks[0]["state"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_worker(real_cifar_small):
    return train(1, real_cifar_small)


@pytest.mark.parametrize("world", [2, 3])
def test_one_seed_trains_the_same_at_1_2_and_3_workers(real_cifar_small, one_worker, world):
    losses, state = train(world, real_cifar_small)
    assert len(losses) == len(one_worker[0]) == 4
    differences = [abs(a - b) for a, b in zip(losses, one_worker[0])]
    print(f"\n[workers] {world} vs 1: per-step loss differences {['%.1e' % d for d in differences]}, "
          f"max weight difference {_max_diff(state, one_worker[1]):.1e}")
    assert max(differences) < LOSS_TOL
    assert _max_diff(state, one_worker[1]) < WEIGHT_TOL


def test_per_worker_batchnorm_is_a_different_training(real_cifar_small, one_worker):
    """The switch does what it says: another normalisation is a difference far above float order's."""
    losses, state = train(2, real_cifar_small, "batchnorm=per_worker")
    print(f"\n[workers] per-worker BN at 2 vs 1: first-step loss difference {abs(losses[0] - one_worker[0][0]):.1e}, "
          f"max weight difference {_max_diff(state, one_worker[1]):.1e}")
    assert abs(losses[0] - one_worker[0][0]) > 1e-3  # from the first step: other normalisation
    assert _max_diff(state, one_worker[1]) > 1e-2


def test_pooled_statistics_of_uneven_shares_are_the_whole_batchs():
    """Global BatchNorm's forward pools each rank's [mean, variance, count]: for shares of 22, 21 and 21 images whose
    channels sit far from zero (mean 1000, std 1: where E[x^2] - E[x]^2 in float32 is off by up to 7 %), the pooled
    mean and variance are the whole batch's."""
    torch.manual_seed(0)
    whole = (torch.randn(64, 3, 4, 4) + 1000).contiguous(memory_format=torch.channels_last)
    rows = [torch.cat([*(s.double() for s in torch.batch_norm_update_stats(share, None, None, 0.0)),
                       torch.tensor([share.numel() / 3], dtype=torch.float64)])
            for share in whole.split([22, 21, 21])]
    mean, var, total = _pooled(torch.stack(rows))
    assert total.item() == 64 * 16
    torch.testing.assert_close(mean, whole.double().mean((0, 2, 3)), rtol=1e-6, atol=0)  # float32 means
    torch.testing.assert_close(var, whole.double().var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
