"""One measurement of the GPU check (bench/gpu_check.py), in its own process:

    python -m bench.gpu_measure '{"kind": "train", ...}'

Each result is printed on a line of its own as `BENCH_RESULT {json}` as soon as it is known, so a later part that
fails or is killed leaves the earlier ones; a failure is printed as `BENCH_ERROR <one line>` before exiting 1.
The process is set up as a Ray Train worker is: torch threads and OMP_NUM_THREADS are the CPUs it would be given,
and on CUDA `cudnn.benchmark` is on (raytrain.worker sets it with the dataset on the GPU).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.precision import model_only_images_per_s
from bench.synthetic import synthetic_cifar, write_cifar_batches
from bench.throughput import RESULT_TAG, StepStamps
from ray_resnet.config import Config, replace
from ray_resnet.core.loop import Hooks, Splits

ERROR_TAG = "BENCH_ERROR "
BATCH = 128  # the recipe's global batch (OptimConfig.batch_size)
# perf settings of each mode of the training rows
MODES = {"eager": {"compile": "off"}, "compiled": {"compile": "on"},
         "compiled + CUDA graphs": {"compile": "on", "cuda_graphs": True}}
SEED_DATA = 0  # synthetic images: the same in every process


def emit(result: dict) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


def worker_like(threads: int) -> torch.device:
    """The device, threads and cuDNN setting of a Ray Train worker with `threads` CPUs."""
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: as raytrain.worker sets it on CUDA
        return torch.device("cuda")
    return torch.device("cpu")


def dataset(spec: dict, train: int, test: int, device: torch.device) -> tuple[Config, Splits]:
    """The run's config (spec's model and perf, one epoch of `train` images, `test` test images) and its splits on
    `device`: spec["data"]'s real images when given, else synthetic ones of exactly those sizes."""
    from ray_resnet.core.datasets import load_cifar
    from ray_resnet.core.loop import select_splits

    cfg = replace(Config(model=spec["model"]), data={"train_subset": train, "test_subset": test},
                  schedule={"epochs": spec.get("epochs", 1), "warmup_epochs": 1, "milestones": []},
                  perf={"amp": spec["precision"], **MODES[spec["mode"]]})
    if spec.get("data"):
        arrays = {}
        for split in ("train", "test"):
            images, labels = load_cifar(spec["data"], split)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.to(device), labels.to(device)
    else:
        arrays = synthetic_cifar(train, test, SEED_DATA, device)
    return cfg, select_splits(cfg, arrays)


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measure_training(spec: dict) -> None:
    """The engine (core.loop.fit: one epoch of warmup + steps batches, augmentation and evaluation included), then
    the model alone on the same compiled model: forward + backward + SGD step on pre-augmented batches."""
    from ray_resnet.core.loop import build_training, fit, steps_per_epoch

    device = worker_like(spec["threads"])
    total = spec["warmup"] + spec["steps"]
    cfg, data = dataset(spec, total * BATCH, spec["eval_images"], device)
    start = time.time()
    training = build_training(cfg, device, steps_per_epoch(cfg, len(data.train_index), 1))
    stamps = StepStamps(device, total, spec["warmup"])
    fit(cfg, training, data, hooks=[stamps])
    emit({"engine": stamps.steady_images_per_s(), "first_step_s": stamps.stamps[0] - start,
          "peak_mib": peak_memory_mib(device)})
    emit({"model_only": model_only_images_per_s(cfg, training, data, device, spec["warmup"], spec["steps"])})


class WindowClosed(Exception):
    """Raised from a hook to end `fit` once the shared timing window is over."""


class SharedWindow(Hooks):
    """Times the steps of one of several processes training at once: after the warm-up steps it marks itself
    ready in `sync_dir` and waits for the check's `go` file (written once all are ready), then counts its steps
    until the go time + `window_s`."""

    def __init__(self, device: torch.device, warmup: int, sync_dir: Path, rank: int, window_s: float):
        self.device, self.warmup, self.sync_dir, self.rank, self.window_s = device, warmup, sync_dir, rank, window_s
        self.steps, self.start, self.images = 0, 0.0, 0

    def step_end(self, step: int, images: int, loss: torch.Tensor, lr: float) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = self.wait_for_go()
        elif self.steps > self.warmup:
            self.images += images
            if time.time() >= self.start + self.window_s:
                self.sync()
                raise WindowClosed

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wait_for_go(self) -> float:
        self.sync()
        (self.sync_dir / f"ready{self.rank}").touch()
        go = self.sync_dir / "go"
        while not go.exists():
            time.sleep(0.01)
        start = float(go.read_text())  # a moment ahead, so every process starts at once
        time.sleep(max(0.0, start - time.time()))
        return start


def measure_sharing(spec: dict) -> None:
    """One of spec["processes"] processes training at once (the engine, with evaluation every epoch as a sweep
    trial's): its img/s over the shared window."""
    from ray_resnet.core.loop import build_training, fit, steps_per_epoch

    device = worker_like(spec["threads"])
    cfg, data = dataset({**spec, "epochs": 10_000}, spec["train_images"], spec["eval_images"], device)
    training = build_training(cfg, device, steps_per_epoch(cfg, len(data.train_index), 1))
    window = SharedWindow(device, spec["warmup"], Path(spec["sync_dir"]), spec["rank"], spec["window_s"])
    try:
        fit(cfg, training, data, hooks=[window])
    except WindowClosed:
        emit({"images_per_s": window.images / (time.time() - window.start), "peak_mib": peak_memory_mib(device)})
        return
    raise RuntimeError("training ended before the timing window closed: raise train_images")


def ray_data_sets(spec: dict, scratch: Path) -> list[str]:
    """The --set lines that point a Ray step at its data: the real images if given, else synthetic ones written to
    `scratch` (their decoded-array cache there too, not in the user's cache); subsets of spec's sizes."""
    sizes = [f"data.train_subset={spec['train_images']}", f"data.test_subset={spec['eval_images']}"]
    if spec.get("data"):
        return [f"data.root={spec['data']}", *sizes]
    root = write_cifar_batches(scratch / "data", synthetic_cifar(spec["train_images"], spec["eval_images"], SEED_DATA))
    return [f"data.root={root}", f"data.cache_dir={scratch / 'cache'}", *sizes]


def measure_ray_run(spec: dict) -> None:
    """A short real run through Ray Train (raytrain.driver.run_training, 1 worker) of resnet20."""
    from ray_resnet.config import load_config
    from ray_resnet.raytrain.driver import run_training

    with tempfile.TemporaryDirectory(prefix="gpu-check-ray-") as scratch:
        epochs = spec["epochs"]
        milestones = sorted({m for m in (epochs // 2, epochs * 3 // 4) if m >= 1})  # the recipe's 100/150 of 200
        cfg = load_config(None, [*ray_data_sets(spec, Path(scratch)), f"schedule.epochs={epochs}",
                                 "schedule.warmup_epochs=1", f"schedule.milestones={milestones}", "run.name=short",
                                 f"run.storage={scratch}/runs"])
        start = time.perf_counter()
        summary = run_training(cfg)
        emit({"test_acc": summary.final_test_acc, "wall_s": time.perf_counter() - start})


def measure_ray_sweep(spec: dict) -> None:
    """spec["trials"] resnet20 trials at once through the real sweep path (raytrain.sweep.run_sweep), each one
    worker with 1/trials of the GPU (on a CPU: 1 CPU each): the trials' summed img/s in their last epoch."""
    import csv
    import statistics

    from ray_resnet.io.rundir import trial_dirs
    from ray_resnet.raytrain.sweep import load_sweep, run_sweep

    trials, use_gpu = spec["trials"], torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu-check-sweep-") as scratch:
        file = Path(scratch) / "sweep.yaml"
        file.write_text(f"""config:
  schedule: {{epochs: {spec['epochs']}, warmup_epochs: 0, milestones: []}}
  run: {{device: {"cuda" if use_gpu else "cpu"}}}
grid:
  seed: {list(range(trials))}
resources: {{workers_per_trial: 1, {f"gpus_per_worker: {1 / trials}" if use_gpu else "cpus_per_worker: 1"}}}
""")
        sweep = load_sweep(file, sets=ray_data_sets(spec, Path(scratch)), storage=f"{scratch}/runs")
        outcome = run_sweep(sweep)
        rates = []
        for trial in trial_dirs(sweep.dir):
            with open(Path(trial) / "progress.csv") as f:
                rates.append(float(list(csv.DictReader(f))[-1]["train_images_per_s"]))
        emit({"at_once": min(trials, outcome.max_concurrent_trials), "finished": outcome.finished,
              "images_per_s": sum(rates), "per_trial": statistics.median(rates)})


MEASURES = {"train": measure_training, "share": measure_sharing, "ray_run": measure_ray_run,
            "ray_sweep": measure_ray_sweep}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        if spec.get("ray"):
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        MEASURES[spec["kind"]](spec)
    except BaseException as e:  # the check's table gets one line; the traceback goes to the log
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(ERROR_TAG + f"{type(e).__name__}: {first}".rstrip(": "), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
