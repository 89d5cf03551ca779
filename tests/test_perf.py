"""The fast paths compute what the plain path computes: bf16 autocast, torch.compile, batched augmentation, and
(on CUDA only) a training step without host syncs. No timings here: speed lives in bench/throughput.py."""

import os
import socket
import warnings

import pytest
import torch

from ray_resnet.config import OptimConfig, ScheduleConfig
from ray_resnet.core.augment import augment
from ray_resnet.core.batches import epoch_batches
from ray_resnet.core.models import build_model
from ray_resnet.core.precision import autocast, training_precision
from ray_resnet.core.steps import (
    CPU_COMPILE_MIN_STEPS,
    LabeledImages,
    StepSettings,
    Training,
    compile_model,
    compiles,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)

NO_WARMUP = ScheduleConfig(warmup_epochs=0)


def _tiny_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 4


def _one_step(model_name, images, labels, device="cpu", compiled=False, **perf):
    """Weights before, weights after and the metrics of one training step from seed 0."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=4).to(device, memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, OptimConfig(lr=0.1))
    sched = make_scheduler(opt, 0.1, NO_WARMUP, 1)
    training = Training(compile_model(model, torch.device(device), compiled), opt, sched, core=model)
    metrics = train_one_epoch(training, LabeledImages(images, labels), epoch_batches(len(labels), len(labels), 1, 0, 0, 0),
                              torch.Generator(device).manual_seed(0), StepSettings(**perf))
    return before, [p.detach() for p in model.parameters()], metrics


def test_bf16_autocast_step_matches_the_fp32_step():
    images, labels = _tiny_data(32)
    before, fp32, m32 = _one_step("resnet20", images, labels, amp="fp32")
    _, bf16, m16 = _one_step("resnet20", images, labels, amp="bf16")
    # bf16 rounds every conv's and matmul's inputs and weights to 8 significant bits (<= 2^-8 = 0.4 % each, on any
    # CPU; the kernels only change the float32 accumulation order): the loss moves by less (seen 0.17 %).
    assert m16["loss"] == pytest.approx(m32["loss"], rel=2e-2)
    update32 = torch.cat([(a - b).flatten() for a, b in zip(fp32, before)])
    update16 = torch.cat([(a - b).flatten() for a, b in zip(bf16, before)])
    # bf16 keeps 8 bits of mantissa: the update points the same way and has the same size, to ~1 %.
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0).item() > 0.99
    assert update16.norm().item() == pytest.approx(update32.norm().item(), rel=2e-2)


@pytest.mark.parametrize("capabilities, auto", [({"amx_bf16": True, "avx512_bf16": True}, "bf16"),
                                                ({"amx_bf16": False, "avx512_bf16": True}, "fp32"), ({}, "fp32")])
def test_auto_precision_is_bf16_only_on_cpus_with_bf16_matrix_units(monkeypatch, capabilities, auto):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    cpu = torch.device("cpu")
    assert training_precision(cpu, "auto") == auto
    assert (training_precision(cpu, "fp32"), training_precision(cpu, "bf16")) == ("fp32", "bf16")
    with autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") == (auto == "bf16")


def test_compile_switch():
    model = build_model("resnet20")
    assert compile_model(model, torch.device("cpu"), False) is model
    compiled = compile_model(model, torch.device("cpu"), True)
    assert compiled is not model and list(compiled.parameters())[0] is list(model.parameters())[0]


@pytest.mark.parametrize("amx", [True, False])
def test_auto_compiles_where_measured_to_pay(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": amx})
    cpu, cuda, long_run = torch.device("cpu"), torch.device("cuda"), CPU_COMPILE_MIN_STEPS
    assert [compiles(setting, cpu) for setting in ("on", "off")] == [True, False]
    # CPU: bf16 on AMX, for runs long enough to win back the compile; fp32 and emulated bf16 never
    assert compiles("auto", cpu, 1, "bf16", long_run) == amx and compiles("auto", cpu, 2, "bf16", long_run) == amx
    assert not compiles("auto", cpu, 1, "bf16", long_run - 1)
    assert not compiles("auto", cpu, 1, "fp32", 100 * long_run)
    # CUDA: one worker; several stay eager (compile + DDP + global BatchNorm has not run on GPUs yet)
    assert compiles("auto", cuda, world=1) and not compiles("auto", cuda, world=2)


def test_the_seed_recipe_on_an_amx_cpu_compiles_and_a_short_run_does_not(monkeypatch):
    from ray_resnet.config import load_config
    from ray_resnet.core.loop import build_training

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    cpu = torch.device("cpu")
    assert build_training(load_config(None, ["perf.compile=auto"]), cpu, 391).compiled  # 200 epochs of 391 steps
    short = ["perf.compile=auto", "schedule.epochs=3", "schedule.warmup_epochs=0", "schedule.milestones=[]"]
    assert not build_training(load_config(None, short), cpu, 391).compiled
    assert not build_training(load_config(None, []), cpu, 391).compiled  # the default: off


def test_an_epochs_tail_batch_gets_a_static_graph_of_its_own_compiled_once():
    from torch._dynamo.utils import counters

    # a small net: what is tested is how often torch.compile compiles, not the ResNet (minutes on 2 CPU cores)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 4))
    opt = make_optimizer(model, OptimConfig(lr=0.1))
    training = Training(compile_model(model, torch.device("cpu"), True), opt, make_scheduler(opt, 0.1, NO_WARMUP, 2),
                        core=model)
    images, labels = _tiny_data(24)
    torch._dynamo.reset()
    counters.clear()
    for epoch in range(2):  # batches of 16 and the tail of 8, twice
        train_one_epoch(training, LabeledImages(images, labels), epoch_batches(24, 16, 1, 0, epoch, 0),
                        torch.Generator().manual_seed(epoch), StepSettings(amp="fp32", channels_last=False))
    assert counters["stats"]["unique_graphs"] == 2  # one per batch size, none recompiled in the second epoch
    training.model(images[:4].float())
    assert counters["stats"]["unique_graphs"] == 3  # static: a third size compiles its own, no dynamic graph reused


def test_compile_on_is_refused_for_several_gpu_workers_before_any_starts():
    from ray_resnet.config import load_config
    from ray_resnet.errors import ConfigError
    from ray_resnet.raytrain.cluster import plan_resources

    gpus = ["run.autoscaling=true", "perf.compile=on"]  # an autoscaling run plans GPU workers without a cluster
    with pytest.raises(ConfigError, match="perf.compile=on with run.num_workers=2 GPU workers has not been run yet"):
        plan_resources(load_config(None, [*gpus, "run.num_workers=2"]))
    assert plan_resources(load_config(None, gpus)).use_gpu  # one GPU worker compiles
    assert not plan_resources(load_config(None, [*gpus, "run.num_workers=2", "run.device=cpu"])).use_gpu


def test_compiled_step_matches_the_eager_step():
    # resnet8 (one block per stage): compiling forward + backward of resnet20 takes minutes on 2 CPU cores.
    images, labels = _tiny_data(16)
    _, eager, _ = _one_step("resnet8", images, labels, amp="fp32")
    _, compiled, _ = _one_step("resnet8", images, labels, compiled=True, amp="fp32")
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # inductor's kernels sum in another order (float32)


def test_batched_crop_offsets_and_flips_are_uniform_per_sample():
    # One bright pixel; where it lands gives each sample's crop offset, whether its x is mirrored its flip.
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[..., 10, 10] = 255
    n = 9 * 9 * 2 * 60
    out = augment(image.expand(n, -1, -1, -1), torch.Generator().manual_seed(7), erase_p=0)
    hits = (out[:, 0] == out[:, 0].amax(dim=(1, 2), keepdim=True)).flatten(1).float().argmax(1)
    ys, xs = hits // 32, hits % 32
    dy = 10 - ys  # marker at row 10 lands on row 10 + 4 - offset
    flipped = xs > 16  # mirrored column 31 - (x), always > 16 for a marker at column 10 +- 4
    dx = torch.where(flipped, 31 - xs, xs) - 10
    for values, cells in ((dy, range(-4, 5)), (dx, range(-4, 5)), (flipped.long(), (0, 1))):
        counts = torch.stack([(values == c).sum() for c in cells]).float()
        expected = n / len(cells)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert counts.sum() == n and chi2 < 30, counts  # chi2 with <= 8 dof: p < 1e-3 above ~27


@pytest.mark.gpu  # host syncs only exist with a CUDA device
def test_training_steps_do_not_sync_the_host_on_cuda():
    """The syncs of an epoch are those of its end-of-epoch metrics: as many for 6 steps as for 1."""
    images, labels = _tiny_data(96)
    images, labels = images.cuda(), labels.cuda()
    counts = []
    for n in (16, 96):  # 1 step, then 6 steps of 16
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=4).cuda().to(memory_format=torch.channels_last)
        opt = make_optimizer(model, OptimConfig())
        sched = make_scheduler(opt, 0.1, NO_WARMUP, 6)
        steps = epoch_batches(n, 16, 1, 0, 0, 0)
        training, data = Training(model, opt, sched), LabeledImages(images, labels)
        train_one_epoch(training, data, steps, torch.Generator("cuda").manual_seed(0))  # warm
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_one_epoch(training, data, steps, torch.Generator("cuda").manual_seed(0))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchronizing" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a CUDA device")
def test_global_batchnorm_math_does_not_sync_the_host_on_cuda():
    """Forward and backward of the global BatchNorm layer (its collectives are no-ops in one process; NCCL's
    all-reduce is asynchronous) read nothing back to the host."""
    from ray_resnet.core.batchnorm import _GlobalBatchNorm

    x = torch.randn(64, 16, 32, 32, device="cuda", requires_grad=True).to(memory_format=torch.channels_last)
    weight = torch.ones(16, device="cuda", requires_grad=True)
    bias = torch.zeros(16, device="cuda", requires_grad=True)
    _GlobalBatchNorm.apply(x, weight, bias, 1e-5)[0].sum().backward()  # warm
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _GlobalBatchNorm.apply(x, weight, bias, 1e-5)[0].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchronizing" in str(w.message)]


def _ddp_losses(rank, port, compiled, losses):
    """Rank `rank` of 2 gloo processes: 3 steps of resnet8 under DDP with BatchNorm over the global batch."""
    import torch.distributed as dist

    from ray_resnet.core.batchnorm import use_global_batchnorm

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = use_global_batchnorm(build_model("resnet8").to(memory_format=torch.channels_last))
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    net = compile_model(ddp, torch.device("cpu"), compiled)
    optimizer = make_optimizer(model, OptimConfig(lr=0.1))
    images, labels = _tiny_data(32, seed=rank)
    x = images.float().div(255).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), labels)
        loss.backward()
        optimizer.step()
        losses[(rank, compiled)] = losses.get((rank, compiled), []) + [loss.item()]
    dist.destroy_process_group()


def test_compile_with_ddp_and_global_batchnorm_matches_eager():
    """The autograd Function behind global BatchNorm calls a collective in forward and backward: torch.compile
    must keep both, under DDP, on CPU workers (where perf.compile=on is allowed)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        losses = manager.dict()
        for compiled in (False, True):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            mp.spawn(_ddp_losses, args=(port, compiled, losses), nprocs=2)
        for rank in (0, 1):
            assert len(losses[(rank, True)]) == 3
            torch.testing.assert_close(losses[(rank, True)], losses[(rank, False)], rtol=1e-4, atol=1e-5)
