"""torch.compile against eager on this CPU, side by side; writes bench/COMPILE.md (the figures behind
`perf.compile: auto`, core.steps.compiles).

    python -m bench.compile --rows resnet20:fp32 resnet56:fp32 resnet20:bf16:1 --repeats 2   # from the repo root

Each row (model, training precision, workers) trains one epoch of `--warmup` + `--steps` global batches of 128
synthetic images with the engine (core.loop.fit; with 2 workers: DDP over gloo in 2 processes sharing the cores,
BatchNorm over the global batch), three ways, each in a fresh process, interleaved per repeat:

  eager     perf.compile off;
  cold      compiled with an empty inductor cache (what the first run on a machine pays);
  warm      compiled again with the cache the cold run filled (what later runs pay).

The first step's time less eager's is the compile time; img/s counts the steps after the warm-up. The break-even
is the steps a run needs before the compiled steps have won back a cold compile. The loss column compares the
epoch's training loss compiled vs eager (float order differs, so it moves a little).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_measure import BATCH, dataset
from bench.throughput import REPO, RESULT_TAG, StepStamps, machine
from ray_resnet.core.precision import native_bf16

MODES = ("eager", "cold", "warm")
EVAL_IMAGES = 256  # the epoch's evaluation, untimed here: small


class StampsAndLoss(StepStamps):
    """Step stamps, and the epoch's training loss (the same on every rank)."""

    train_loss = float("nan")

    def epoch_end(self, metrics: dict) -> None:
        super().epoch_end(metrics)
        self.train_loss = metrics["train_loss"]


def _train(rank: int, spec: dict, port: int, results) -> None:
    """One rank of a measurement: the engine's epoch under DDP when spec["workers"] > 1."""
    import torch.distributed as dist

    from ray_resnet.core.loop import build_training, fit, steps_per_epoch

    workers = spec["workers"]
    torch.set_num_threads(max(1, os.cpu_count() // workers))  # as Ray Train gives each worker its share
    if workers > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=workers)
    device = torch.device("cpu")
    total = spec["warmup"] + spec["steps"]
    cfg, data = dataset({**spec, "mode": "eager" if spec["mode"] == "eager" else "compiled"}, total * BATCH,
                        EVAL_IMAGES, device)
    def wrap(model: torch.nn.Module, **ddp) -> torch.nn.Module:
        return torch.nn.parallel.DistributedDataParallel(model, **ddp) if workers > 1 else model

    training = build_training(cfg, device, steps_per_epoch(cfg, len(data.train_index), workers), workers, wrap)
    stamps = StampsAndLoss(device, total, spec["warmup"])
    start = time.time()
    fit(cfg, training, data, rank=rank, world=workers, hooks=[stamps])
    if rank == 0:
        results.update(first_step_s=stamps.stamps[0] - start, images_per_s=stamps.steady_images_per_s(),
                       train_loss=stamps.train_loss, compiled=training.compiled)
    if workers > 1:
        dist.destroy_process_group()


def measure(spec: dict) -> None:
    """Runs in the child process: prints the result of rank 0 as one RESULT_TAG line."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        if spec["workers"] == 1:
            _train(0, spec, port, results)
        else:
            mp.spawn(_train, args=(spec, port, results), nprocs=spec["workers"])
        print(RESULT_TAG + json.dumps(dict(results)), flush=True)


def run_child(spec: dict, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-m", "bench.compile", "--child", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"bench.compile {spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def measure_row(args: argparse.Namespace, model: str, precision: str, workers: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            for mode in MODES:  # cold fills the cache warm reads
                spec = {"model": model, "precision": precision, "workers": workers, "mode": mode,
                        "warmup": args.warmup, "steps": args.steps}
                runs[mode].append(run_child(spec, Path(cache)))
                print(f"{model} {precision} x{workers} repeat {repeat + 1}: {mode} "
                      f"{runs[mode][-1]['images_per_s']:,.0f} img/s, first step {runs[mode][-1]['first_step_s']:.1f} s",
                      flush=True)
    return runs


def row_line(model: str, precision: str, workers: int, runs: dict[str, list[dict]]) -> str:
    def median(modes: tuple[str, ...], key: str) -> float:
        return statistics.median(r[key] for mode in modes for r in runs[mode])

    # the cold and the warm run train with the same compiled code: both are samples of its speed
    eager, compiled = median(("eager",), "images_per_s"), median(("cold", "warm"), "images_per_s")
    cold_s = median(("cold",), "first_step_s") - median(("eager",), "first_step_s")
    warm_s = median(("warm",), "first_step_s") - median(("eager",), "first_step_s")
    saved_per_step = BATCH / eager - BATCH / compiled
    break_even = f"{cold_s / saved_per_step:,.0f}" if saved_per_step > 0 else "never"
    loss = max(abs(c["train_loss"] - e["train_loss"]) / abs(e["train_loss"])
               for mode in ("cold", "warm") for c, e in zip(runs[mode], runs["eager"]))
    per_repeat = " / ".join(f"{e['images_per_s']:,.0f}, {c['images_per_s']:,.0f}, {w['images_per_s']:,.0f}"
                            for e, c, w in zip(runs["eager"], runs["cold"], runs["warm"]))
    return (f"| {model} | {precision} | {workers} | {eager:,.0f} | {compiled:,.0f} | **{compiled / eager:.2f}** | "
            f"{cold_s:.0f} | {warm_s:.1f} | {break_even} | {loss:.1e} | {per_repeat} |")


def render(args: argparse.Namespace, host: dict, lines: list[str], wall_s: float) -> str:
    bf16 = "native (AMX)" if native_bf16(torch.device("cpu")) else "emulated (no AMX): auto trains fp32 here"
    return "\n".join([
        "# torch.compile vs eager on CPU",
        "",
        "Generated by `python -m bench.compile " + " ".join(sys.argv[1:]) + f"` in {wall_s / 60:.1f} min; do not "
        "edit by hand.",
        "",
        f"- Machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, GPU: {host['gpu']}; bf16 "
        f"{bf16}; load average {host['load_average']} at the start",
        f"- Software: {host['versions']}; date {host['date']}",
        f"- Workload: the engine (core.loop.fit), global batch {BATCH} of synthetic images, {args.warmup} warm-up + "
        f"{args.steps} timed steps; with 2 workers DDP over gloo in 2 processes of {max(1, os.cpu_count() // 2)} "
        f"thread(s), BatchNorm over the global batch; {args.repeats} interleaved repeat(s), medians.",
        "",
        "| model | precision | workers | eager img/s | compiled img/s | compiled / eager | first compile s | "
        "with warm cache s | break-even steps | train-loss diff | eager, cold, warm img/s per repeat |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *lines,
        "",
        "Rates are medians: eager over its runs, compiled over the cold and the warm runs (the same compiled code). "
        "compiled / eager is their ratio. first compile s: the cold "
        "run's first step less the eager run's; with warm cache s: the same for the warm run. break-even steps: the "
        "cold compile over the time a compiled step saves. train-loss diff: the epoch's training loss, compiled vs "
        "eager, relative (largest over the runs). What `perf.compile: auto` makes of it: core.steps.compiles and "
        "docs/performance.md.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["resnet20:fp32", "resnet56:fp32", "resnet20:bf16",
                                                      "resnet56:bf16"],
                        help="model:precision, or model:precision:workers for one worker count only")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "COMPILE.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(json.loads(args.child))
        return 0
    host, start, lines = machine(), time.perf_counter(), []
    for row in args.rows:
        model, precision, *only = row.split(":")
        for workers in [int(only[0])] if only else args.workers:
            lines.append(row_line(model, precision, workers, measure_row(args, model, precision, workers)))
            args.output.write_text(render(args, host, lines, time.perf_counter() - start))  # rows so far
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
