"""What the same-training-at-any-worker-count design costs, side by side on one machine; writes bench/SCALING.md.

    python -m bench.scaling --steps 30 --repeats 3          # from the repo root

1. BatchNorm over the global batch vs per worker: the Ray Train path of bench.throughput (path c) with 2 CPU
   workers, `batchnorm: global` against `batchnorm: per_worker`, interleaved repeats, in fresh processes.
2. Augmentation keyed on the global batch: every rank draws the crops, flips and erasing (noise included) of the
   whole global batch and keeps its share. Timed in this process: `augment` of a 64-image share drawing for a
   global batch of 128 vs drawing for its 64 images only (and 32 of 128, as with 4 workers).
3. The collective behind global BatchNorm: 2 gloo processes (1 thread each, as the 2 workers) sum a BatchNorm
   layer's statistics (64 channels: 193 float64 values) with `dist.all_reduce` and with `sum_over_ranks` (an
   all-gather, then the sum on each rank), interleaved, median ms per call.
4. Where 2 workers lose against 1 on the same cores: ResNet-20 training steps of the engine's model (channels_last,
   fp32, SGD; random CIFAR-shaped batches: speed does not depend on the pixels) without Ray, global batch 128: 1
   process with 2 threads and with 1; 2 processes of 1 thread each training alone on 64 images; 2 DDP ranks (gloo)
   with per-worker BatchNorm, with its gradient all-reduce left out (`no_sync`), and with global BatchNorm.
   Interleaved repeats; a step's time is the slower rank's median.
5. Global BatchNorm's own arithmetic: the same model's training step on one 64-image share in this process (1
   thread), with torch's BatchNorm and with `GlobalBatchNorm2d` computing as on one of 2 ranks (its collectives
   then have only this process to gather from), interleaved, median ms per step.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import throughput
from ray_resnet.core import batchnorm
from ray_resnet.core.augment import augment
from ray_resnet.core.batches import Step
from ray_resnet.core.batchnorm import use_global_batchnorm
from ray_resnet.core.collectives import sum_over_ranks
from ray_resnet.core.models import build_model

REPO = Path(__file__).resolve().parents[1]
BATCH = throughput.BATCH


def time_augment(share: int, global_count: int | None, repeats: int = 200) -> float:
    """Median seconds of one `augment` call on `share` images (drawing for `global_count` when given)."""
    images = torch.randint(0, 256, (share, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        augment(images, generator, share=Step(torch.arange(share), global_count, 0) if global_count else None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_collectives(rank: int, port: int, calls: int, repeats: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stats = torch.zeros(3 * 64 + 1, dtype=torch.float64)  # sum, sum of squares per channel, count
    ways = {"all_reduce": lambda: dist.all_reduce(stats), "sum_over_ranks": lambda: sum_over_ranks(stats)}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, call in ways.items():
            for _ in range(10):  # warm
                call()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            times[way].append((time.perf_counter() - start) / calls)
    if rank == 0:
        results.update({way: statistics.median(t) for way, t in times.items()})
    dist.destroy_process_group()


def time_collectives(calls: int = 400, repeats: int = 5) -> dict[str, float]:
    """Median seconds per call of each way to sum one BatchNorm layer's statistics over 2 gloo processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_time_collectives, args=(port, calls, repeats, results), nprocs=2)
        return dict(results)


SPLITS = {  # how a global batch of 128 is trained on 2 cores: (processes, threads each, images per process, mode)
    "1 process, 2 threads": (1, 2, BATCH, "alone"),
    "1 process, 1 thread": (1, 1, BATCH, "alone"),
    "2 processes of 1 thread, each alone on 64 images": (2, 1, BATCH // 2, "alone"),
    "2 DDP ranks, per-worker BatchNorm": (2, 1, BATCH // 2, "ddp"),
    "2 DDP ranks, gradient all-reduce left out (no_sync)": (2, 1, BATCH // 2, "ddp_no_sync"),
    "2 DDP ranks, global BatchNorm": (2, 1, BATCH // 2, "ddp_global_bn"),
}


def _median_step_s(model: torch.nn.Module, images: int, steps: int, warmup: int, no_sync: bool = False) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(images, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (images,))
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        with model.no_sync() if no_sync else contextlib.nullcontext():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def time_batchnorm_arithmetic(steps: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of a training step on one rank's share (BATCH / 2 images, 1 thread) with torch's BatchNorm
    and with global BatchNorm's forward and backward as on one of 2 ranks, in this process (no other rank: its
    collectives cost nothing here, so the difference is the layer's own arithmetic)."""
    torch.manual_seed(0)
    models = {"torch BatchNorm2d": build_model("resnet20").to(memory_format=torch.channels_last),
              "GlobalBatchNorm2d": use_global_batchnorm(build_model("resnet20").to(memory_format=torch.channels_last))}
    times: dict[str, list[float]] = {name: [] for name in models}
    with mock.patch.object(batchnorm, "world_size", lambda: 2):  # the layer takes its multi-rank path
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(_median_step_s(model, BATCH // 2, steps, warmup))
    return {name: statistics.median(t) for name, t in times.items()}


def _train_split(rank: int, split: str, port: int, steps: int, warmup: int, results) -> None:
    processes, threads, images, mode = SPLITS[split]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("resnet20").to(memory_format=torch.channels_last)
    if mode != "alone":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=processes)
        if mode == "ddp_global_bn":
            model = use_global_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=mode != "ddp_global_bn")
    results[rank] = _median_step_s(model, images, steps, warmup, no_sync=mode == "ddp_no_sync")
    if mode != "alone":
        dist.destroy_process_group()


def time_split(split: str, steps: int, warmup: int) -> float:
    """Training images/s of one way to split the global batch over the 2 cores (the slower process sets the pace)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_train_split, args=(split, port, steps, warmup, results), nprocs=SPLITS[split][0])
        return BATCH / max(results.values())


def main(argv: list[str] | None = None) -> int:
    parser = throughput.build_parser()
    parser.prog, parser.description = "python -m bench.scaling", __doc__.splitlines()[0]
    parser.set_defaults(steps=30, output=REPO / "bench" / "SCALING.md")
    args = parser.parse_args(argv)
    host, start = throughput.machine(), time.perf_counter()

    runs: dict[str, list[dict]] = {"global": [], "per_worker": []}
    for repeat in range(args.repeats):
        for mode in runs:
            args.batchnorm = mode
            runs[mode].append(throughput.run_child("c2", args))
            print(f"repeat {repeat + 1}/{args.repeats} {mode}: {runs[mode][-1]['train_images_per_s']:,.0f} img/s",
                  flush=True)
    rate = {mode: statistics.median(r["train_images_per_s"] for r in rs) for mode, rs in runs.items()}
    bn_ratio = statistics.median(g["train_images_per_s"] / p["train_images_per_s"]
                                 for g, p in zip(runs["global"], runs["per_worker"]))

    torch.set_num_threads(1)  # as each of 2 workers on 2 cores
    step_s = BATCH / rate["global"]
    augment_rows = []
    for share in (BATCH // 2, BATCH // 4):
        own, whole = time_augment(share, None), time_augment(share, BATCH)
        augment_rows.append(f"| {share} of {BATCH} | {own * 1e3:.2f} | {whole * 1e3:.2f} | "
                            f"{(whole - own) * 1e3:+.2f} | {100 * (whole - own) / step_s:.1f} % |")
    collective_s = time_collectives()
    arithmetic_s = time_batchnorm_arithmetic(args.steps, args.warmup, args.repeats)
    arithmetic_gap_s = arithmetic_s["GlobalBatchNorm2d"] - arithmetic_s["torch BatchNorm2d"]
    splits: dict[str, list[float]] = {split: [] for split in SPLITS}
    for _ in range(args.repeats):
        for split in SPLITS:
            splits[split].append(time_split(split, args.steps, args.warmup))
    alone = statistics.median(splits["1 process, 2 threads"])

    lines = [
        "# Same training at any worker count: what it costs",
        "",
        "Generated by `python -m bench.scaling " + " ".join(sys.argv[1:]) + f"` in "
        f"{(time.perf_counter() - start) / 60:.1f} min; do not edit by hand.",
        "",
        f"- Machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, GPU: {host['gpu']}; load "
        f"average {host['load_average']} at the start",
        f"- Software: {host['versions']}; date {host['date']}",
        f"- Workload: {args.model}, global batch {BATCH}, Ray Train with 2 CPU workers (1 core each), "
        f"{args.warmup} warm-up + {args.steps} timed steps; {args.repeats} interleaved repeats, medians.",
        "",
        "## BatchNorm over the global batch vs per worker (2 CPU workers)",
        "",
        "| batchnorm | train img/s | per repeat |",
        "|---|---:|---|",
        *(f"| {mode} | {rate[mode]:,.0f} | " + ", ".join(f"{r['train_images_per_s']:,.0f}" for r in rs) + " |"
          for mode, rs in runs.items()),
        "",
        f"global / per_worker = **{bn_ratio:.2f}** (median of the per-repeat ratios). On CPU the global statistics "
        "come from `GlobalBatchNorm2d`: each BatchNorm layer gathers every rank's per-channel mean, variance and "
        "count once in the forward pass, and sums the gradients' per-channel sums over the ranks once in the "
        "backward pass (19 layers in ResNet-20: 38 blocking collectives per step), the same code on CUDA.",
        "",
        "## The collective behind global BatchNorm (2 gloo processes, 193 float64 values)",
        "",
        "| way | ms per call | x 38 per step (ms) |",
        "|---|---:|---:|",
        *(f"| {way} | {t * 1e3:.3f} | {38 * t * 1e3:.0f} |" for way, t in collective_s.items()),
        "",
        "`sum_over_ranks` (what `GlobalBatchNorm2d` uses) all-gathers every rank's copy and adds them up on each "
        "rank; for so few values a collective costs its latency, and gloo's all-reduce runs a ring of several "
        f"exchanges. A step takes {step_s * 1e3:.0f} ms with global and {BATCH / rate['per_worker'] * 1e3:.0f} ms "
        f"with per-worker BatchNorm; {38 * collective_s['sum_over_ranks'] * 1e3:.0f} ms of the difference are these "
        f"calls' own time and {arithmetic_gap_s * 1e3:.0f} ms the layer's own arithmetic (below). The rest is each "
        "collective holding both ranks until the slower one arrives, 38 times a step.",
        "",
        "## Global BatchNorm's own arithmetic (one rank's share of 64 images, 1 thread, no other rank)",
        "",
        "| BatchNorm layers | ms per training step |",
        "|---|---:|",
        *(f"| {name} | {t * 1e3:.1f} |" for name, t in arithmetic_s.items()),
        "",
        "The forward pass takes each rank's mean and variance from torch's own one-pass kernel "
        "(`batch_norm_update_stats`) and pools them in float64 (summing the activations in float64 instead, as "
        "before 2026-12-07, first copied every activation to float64).",
        "",
        "## Where 2 workers lose against 1 on the same 2 cores (engine steps, no Ray)",
        "",
        "| how the global batch of 128 is trained | img/s | vs 1 process, 2 threads | per repeat |",
        "|---|---:|---:|---|",
        *(f"| {split} | {statistics.median(rates):,.0f} | {statistics.median(rates) / alone:.2f} | "
          + ", ".join(f"{r:,.0f}" for r in rates) + " |" for split, rates in splits.items()),
        "",
        "Splitting the batch between two 1-thread processes, and DDP's gradient all-reduce, cost what the rows "
        "above say against one process using both cores; global BatchNorm's collectives are the last row's "
        "difference to per-worker BatchNorm. Ray Train's path adds its own processes on top (the first table).",
        "",
        "## Augmentation draws for the whole global batch",
        "",
        "| rank's share | draws for its share (ms) | draws for the global batch (ms) | extra (ms) "
        "| extra / training step |",
        "|---|---:|---:|---:|---:|",
        *augment_rows,
        "",
        f"A training step of the global batch takes {step_s * 1e3:.0f} ms at the global-BatchNorm rate above. "
        "The extra work is drawing random numbers (the erasing noise is most of it), not augmenting images.",
        "",
    ]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
