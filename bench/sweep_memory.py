"""Peak memory of a sweep of concurrent trials; appends a row to bench/SWEEP_MEMORY.md.

    python -m bench.sweep_memory --label "one ray.put per sweep"        # from the repo root

Runs a sweep of `--trials` ResNet-20 trials (1 worker each, one short epoch on a small subset of the whole
CIFAR-10, which every trial loads and shares as in a real sweep) on a local Ray with a CPU per trial, so all run
at once, and samples every 0.2 s the memory of the whole process tree (driver, Ray's daemons, Tune's trial actors,
the Train controllers and workers). PSS splits each shared page (the object store's included) between the
processes that map it, so its sum is the tree's real footprint; the object store's own usage comes from Ray.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.memory import tree_memory
from bench.throughput import REPO, machine

MIB = 2**20


class PeakSampler(threading.Thread):
    """Samples the process tree's PSS and Ray's object store usage until stopped; keeps the peaks (bytes)."""

    def __init__(self, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.interval_s, self.stopped = interval_s, threading.Event()
        self.peak_pss = self.peak_store = 0

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.peak_pss = max(self.peak_pss, tree_memory()["total"]["pss"])
            self.peak_store = max(self.peak_store, object_store_used())

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def object_store_used() -> int:
    """Bytes held in the object stores of the cluster's nodes (Ray's own accounting)."""
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0)
    return int(total - ray.available_resources().get("object_store_memory", total))


def sweep_file(directory: Path, args: argparse.Namespace) -> Path:
    path = directory / "sweep_memory.yaml"
    path.write_text(f"""config:
  model: resnet20
  data: {{root: {args.data}, train_subset: {args.train_images}, test_subset: 200}}
  schedule: {{epochs: 1, warmup_epochs: 0, milestones: []}}
grid:
  seed: {list(range(args.trials))}
resources: {{workers_per_trial: 1, cpus_per_worker: 1}}
""")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="what this row measures, e.g. the code's version")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=512, help="each trial's training subset")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "cifar10"))
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "SWEEP_MEMORY.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from ray_resnet.raytrain.sweep import load_sweep, run_sweep

    host = machine()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        sweep = load_sweep(sweep_file(Path(tmp), args), storage=tmp)
        ray.init(num_cpus=args.trials, include_dashboard=False, log_to_driver=False)
        sampler = PeakSampler()
        start = time.perf_counter()
        sampler.start()
        try:
            outcome = run_sweep(sweep)
        finally:
            sampler.stop()
            ray.shutdown()
    if outcome.finished != args.trials:
        raise SystemExit(f"the sweep finished {outcome.finished} of {args.trials} trials: {outcome.errors}")
    row = (f"| {args.label} | {args.trials} | {outcome.max_concurrent_trials} | {sampler.peak_pss / MIB:,.0f} | "
           f"{sampler.peak_store / MIB:,.0f} | {time.perf_counter() - start:.0f} | {host['cpu']} | "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} |")
    if not args.output.exists():
        args.output.write_text(
            "# Peak memory of a sweep\n\nRows appended by `python -m bench.sweep_memory --label LABEL` (see its "
            "docstring): ResNet-20 trials of one worker each, all running at once on a local Ray, each training one "
            f"short epoch on {args.train_images} images of the whole CIFAR-10 (decoded: 176 MiB of uint8 arrays).\n\n"
            "| code | trials | at once | peak PSS of all processes (MiB) | peak object store (MiB) | wall (s) "
            "| CPU | date (UTC) |\n|---|---:|---:|---:|---:|---:|---|---|\n")
    with args.output.open("a") as f:
        f.write(row + "\n")
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
