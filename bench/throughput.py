"""Training and evaluation throughput, side by side on one machine; writes bench/RESULTS.md.

    python -m bench.throughput --model resnet20 --steps 50          # from the repo root

  a  the plain community loop: a torchvision-CIFAR10-style dataset of PIL images, torchvision transforms
     (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), a DataLoader, model, SGD step;
  b  ray_resnet's training loop (`fit.fit`) without Ray, with the default PerfConfig;
  c  the full Ray Train path (`raytrain.driver.run_training`, TorchTrainer) with 1 and with 2 workers.

b and c train one epoch of exactly `--warmup` + `--steps` global batches (a class-balanced subset of the whole
dataset, which is loaded and shared as in a real run) and evaluate `--eval-images` test images; a `fit` hook
stamps the end of every step.

Every measurement runs in a fresh subprocess (own memory accounting; no idle Ray daemons taking CPU from a
and b), and the repeats are interleaved (a, b, c1, c2, a, b, ...) so that load from other users of the
machine hits all paths alike. Each run trains `--warmup` + `--steps` steps of the recipe's batch; images/s
counts only the steps after the warm-up. Tables show medians over the repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.memory import tree_cpu_seconds, tree_memory
from ray_resnet.config import Config, PerfConfig, replace
from ray_resnet.core.loop import Hooks

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
TIMING_FILE_ENV = "RAY_RESNET_BENCH_TIMINGS"  # where the Ray workers of path c write their step stamps
DRIVER_PID_ENV = "RAY_RESNET_BENCH_DRIVER_PID"  # root of path c's process tree (driver, Ray daemons, workers)
PATHS = {
    "a": "a: plain PyTorch loop (PIL + torchvision transforms + DataLoader)",
    "b": "b: ray_resnet engine, no Ray",
    "c1": "c: Ray Train, 1 worker",
    "c2": "c: Ray Train, 2 workers",
}
MIB = 2**20
WORKER_NAME = "ray::RayTrainWorker"  # the process title of Ray Train's workers
BATCH = 128  # the recipe's (OptimConfig.batch_size), used by every path


# --------------------------------------------------------------------------------------------- step stamps


class StepStamps(Hooks):
    """A `fit` hook: wall-clock time (time.time(), comparable across processes) at the end of every step.

    On CUDA it synchronizes only at the stamps throughput is computed from.
    """

    def __init__(self, device: torch.device, total: int, warmup: int):
        self.device, self.total, self.warmup = device, total, warmup
        self.stamps: list[float] = []
        self.images: list[int] = []  # global batch of each step
        self.eval_images_per_s = 0.0

    def step_end(self, step: int, images: int, loss: torch.Tensor, lr: float) -> None:
        if self.device.type == "cuda" and len(self.stamps) in (0, self.warmup - 1, self.total - 1):
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.time())
        self.images.append(images)

    def epoch_end(self, metrics: dict) -> None:
        self.eval_images_per_s = metrics["test_images_per_s"]

    def steady_images_per_s(self) -> float:
        return steady_images_per_s(self.stamps, self.images, self.warmup)


def steady_images_per_s(stamps: list[float], images_per_step: list[int], warmup: int) -> float:
    """Images of the steps after the warm-up over their time (from the end of the last warm-up step)."""
    return sum(images_per_step[warmup:]) / (stamps[-1] - stamps[warmup - 1])


def bench_config(args: argparse.Namespace, **run) -> Config:
    """The recipe for one epoch of exactly warmup + steps global batches, evaluated on eval_images test images
    (subsets of the whole dataset, which is loaded and shared as in a real run)."""
    return replace(Config(model=args.model, batchnorm=args.batchnorm), data={"root": args.data, "train_subset": (args.warmup + args.steps) * BATCH,
                                                   "test_subset": args.eval_images},
                   schedule={"epochs": 1, "warmup_epochs": 1, "milestones": []}, run=run)


# ------------------------------------------------------------------------------------ a: the plain loop


class PILCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, images_nhwc, labels, transform):
        self.images, self.labels, self.transform = images_nhwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def run_plain(args: argparse.Namespace) -> dict:
    from torchvision import transforms as T

    from ray_resnet.config import OptimConfig
    from ray_resnet.constants import IMAGENET_MEAN, IMAGENET_STD
    from ray_resnet.core.datasets import load_cifar
    from ray_resnet.core.models import build_model

    recipe = OptimConfig()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    images, labels = load_cifar(args.data, "train")
    test_images, test_labels = load_cifar(args.data, "test")
    to_tensor = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_set = PILCifar(images.permute(0, 2, 3, 1).numpy(), labels.numpy(),
                         T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *to_tensor]))
    test_set = PILCifar(test_images[: args.eval_images].permute(0, 2, 3, 1).numpy(),
                        test_labels[: args.eval_images].numpy(), T.Compose(to_tensor))
    loader_args = {"num_workers": args.loader_workers, "pin_memory": device.type == "cuda"}
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True,
                                               drop_last=True, **loader_args)
    model = build_model(args.model).to(device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    total = args.warmup + args.steps
    stamps, running_loss = [], 0.0
    model.train()
    batches = iter(train_loader)  # held until measured: dropping the iterator stops the loader's processes
    for step, (x, y) in enumerate(batches):
        if step == args.warmup:
            helper_cpu = tree_cpu_seconds(os.getpid(), {os.getpid()})
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # the usual running-loss print; a host sync on GPU
        stamps.append(time.time())
        if step + 1 == total:
            break
    helper_cpu = tree_cpu_seconds(os.getpid(), {os.getpid()}) - helper_cpu
    helper_cores = helper_cpu / (stamps[-1] - stamps[args.warmup - 1])
    memory = tree_memory()
    del batches
    model.eval()
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(test_set, batch_size=recipe.batch_size, **loader_args):
            model(x.to(device))  # warm-up pass
            break
        eval_start, seen, correct = time.perf_counter(), 0, 0
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=recipe.batch_size, **loader_args):
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            seen += len(y)
        eval_ips = seen / (time.perf_counter() - eval_start)
    return {"train_images_per_s": steady_images_per_s(stamps, [recipe.batch_size] * total, args.warmup),
            "eval_images_per_s": eval_ips, "first_step_s": stamps[0] - start, "memory": memory,
            "helper_cores": helper_cores}


# ------------------------------------------------------------------------------------- b: the engine


def engine_setup(cfg: Config, device: torch.device):
    """(Splits, Training) of `cfg` on `device` without Ray, the dataset on the device as a worker holds it."""
    from ray_resnet.core.datasets import load_cifar
    from ray_resnet.core.loop import build_training, select_splits, steps_per_epoch

    arrays = {}
    for split in ("train", "test"):
        images, labels = load_cifar(cfg.data.root, split)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.to(device), labels.to(device)
    data = select_splits(cfg, arrays)
    return data, build_training(cfg, device, steps_per_epoch(cfg, len(data.train_index), 1))


def run_engine(args: argparse.Namespace) -> dict:
    from ray_resnet.core.loop import fit

    cfg = bench_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    data, training = engine_setup(cfg, device)
    stamps = StepStamps(device, args.warmup + args.steps, args.warmup)
    fit(cfg, training, data, hooks=[stamps])
    return {"train_images_per_s": stamps.steady_images_per_s(), "eval_images_per_s": stamps.eval_images_per_s,
            "first_step_s": stamps.stamps[0] - start, "memory": tree_memory(), "helper_cores": 0.0}


# ---------------------------------------------------------------------------------- c: Ray Train path


class WorkerStamps(StepStamps):
    """StepStamps in a Ray Train worker: also the CPU of the path's other processes during the steps and, on rank 0,
    the memory of the whole process tree after the last step; written to a file per rank at the epoch's end."""

    def __init__(self, total: int, warmup: int):
        import psutil
        import ray.train
        import ray.train.torch

        super().__init__(ray.train.torch.get_device(), total, warmup)
        self.rank = ray.train.get_context().get_world_rank()
        self.driver = int(os.environ[DRIVER_PID_ENV])
        # made once the worker holds the dataset, before its model: the stages of the time to the first step
        self.record: dict = {"rank": self.rank, "pid": os.getpid(), "dataset_at": time.time(),
                             "process_started_at": psutil.Process().create_time()}

    def step_end(self, step: int, images: int, loss: torch.Tensor, lr: float) -> None:
        super().step_end(step, images, loss, lr)
        if len(self.stamps) in (self.warmup, self.total):
            self.record[f"helper_cpu_at_{len(self.stamps)}"] = tree_cpu_seconds(self.driver, exclude_prefix=WORKER_NAME)
        if len(self.stamps) == self.total and self.rank == 0:  # every rank is at its last step: the training set
            self.record["memory"] = tree_memory(self.driver, watch=WORKER_NAME)

    def epoch_end(self, metrics: dict) -> None:
        super().epoch_end(metrics)
        cpu = self.record.pop(f"helper_cpu_at_{self.total}") - self.record.pop(f"helper_cpu_at_{self.warmup}")
        self.record.update(first_step_at=self.stamps[0], train_images_per_s=self.steady_images_per_s(),
                           eval_images_per_s=self.eval_images_per_s,
                           helper_cores=cpu / (self.stamps[-1] - self.stamps[self.warmup - 1]))
        Path(f"{os.environ[TIMING_FILE_ENV]}.rank{self.rank}").write_text(json.dumps(self.record))


def run_ray(args: argparse.Namespace, workers: int) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from ray_resnet.raytrain.driver import run_training

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    cfg = bench_config(args, num_workers=workers, storage=str(tmp), name="bench")
    timing_file = tmp / "timings"
    start = time.time()
    try:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {TIMING_FILE_ENV: str(timing_file), DRIVER_PID_ENV: str(os.getpid()),
                                           "PYTHONPATH": os.pathsep.join(filter(None, (
                                               str(REPO), os.environ.get("PYTHONPATH"))))}})
        ray_init_s = time.time() - start
        total, warmup = args.warmup + args.steps, args.warmup
        run_training(cfg, worker_hooks=lambda: [WorkerStamps(total, warmup)])
        ray.shutdown()
        rank0 = json.loads(Path(f"{timing_file}.rank0").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"train_images_per_s": rank0["train_images_per_s"], "eval_images_per_s": rank0["eval_images_per_s"],
            "first_step_s": rank0["first_step_at"] - start, "ray_init_s": ray_init_s, "memory": rank0["memory"],
            "helper_cores": rank0["helper_cores"],
            "stages_s": {"ray.init": ray_init_s,
                         "to the worker's process": rank0["process_started_at"] - start - ray_init_s,
                         "to the worker's dataset": rank0["dataset_at"] - rank0["process_started_at"],
                         "to the end of the first step": rank0["first_step_at"] - rank0["dataset_at"]}}


# ------------------------------------------------------------------------------------------ the driver


def run_child(path: str, args: argparse.Namespace) -> dict:
    """One measurement in a fresh interpreter; returns its result dict."""
    command = [sys.executable, "-m", "bench.throughput", "--child", path, "--model", args.model,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", args.data,
               "--eval-images", str(args.eval_images), "--loader-workers", str(args.loader_workers),
               "--batchnorm", args.batchnorm]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"bench path {path} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def machine() -> dict:
    import torchvision

    from ray_resnet.io.environment import package_version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kb / 2**20, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "versions": f"Python {platform.python_version()}, torch {torch.__version__}, "
                        f"torchvision {torchvision.__version__}, ray {package_version('ray') or 'not installed'}"}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def render(args: argparse.Namespace, host: dict, runs: dict[str, list[dict]], wall_s: float) -> str:
    def ratio(num: str, den: str, key: str = "train_images_per_s") -> float:
        return statistics.median(n[key] / d[key] for n, d in zip(runs[num], runs[den]))

    ratios = {"a": "", "b": f"b/a {ratio('b', 'a'):.2f}", "c1": f"c/b {ratio('c1', 'b'):.2f}",
              "c2": f"c/b {ratio('c2', 'b'):.2f}"}
    lines = [
        "# Throughput: plain PyTorch vs the engine vs Ray Train",
        "",
        "Generated by `python -m bench.throughput " + " ".join(sys.argv[1:]) + f"` in {wall_s / 60:.1f} min; "
        "do not edit by hand.",
        "",
        f"- Machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, GPU: {host['gpu']}; "
        f"load average (1/5/15 min) {host['load_average']} at the start, "
        + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end (other users' work shares the cores)",
        f"- Software: {host['versions']}",
        f"- Date: {host['date']}",
        f"- Workload: {args.model}, batch {BATCH}, {args.warmup} warm-up + {args.steps} timed training steps, "
        f"evaluation of {args.eval_images} test images (a: after a warm-up batch; b, c: the epoch's evaluation, first "
        f"batch included); repeats: {args.repeats}, interleaved, "
        f"medians; path a uses DataLoader num_workers={args.loader_workers}, evaluation batch 128; b and c use the "
        f"default PerfConfig ({', '.join(f'{k} {v}' for k, v in dataclasses.asdict(PerfConfig()).items())}).",
        "",
        "| path | train img/s | ratio (train) | eval img/s | time to first step (s) | PSS (MiB) "
        "| sum of peak RSS (MiB) | helper CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path, label in PATHS.items():
        r = runs[path]
        lines.append(f"| {label} | {_median(r, 'train_images_per_s'):,.0f} | {ratios[path]} | "
                     f"{_median(r, 'eval_images_per_s'):,.0f} | {_median(r, 'first_step_s'):.1f} | "
                     f"{statistics.median(x['memory']['total']['pss'] for x in r) / MIB:,.0f} | "
                     f"{statistics.median(x['memory']['total']['hwm'] for x in r) / MIB:,.0f} | "
                     f"{_median(r, 'helper_cores'):.2f} |")
    b_a, c1_b, c2_b = ratio("b", "a"), ratio("c1", "b"), ratio("c2", "b")
    workers = runs["c2"][-1]["memory"]["watched"]
    dataset_mib = (50_000 + 10_000) * 3 * 32 * 32 / MIB
    lines += [
        "",
        "Ratios are medians of the per-repeat ratios (each repeat runs a, b, c back to back). Time to first step "
        "runs from the start of the path (reading the decoded dataset; for c, `ray.init`, "
        f"{_median(runs['c1'], 'ray_init_s'):.1f} s, and the TorchTrainer start) to the end of the first "
        "optimizer step. Memory covers all processes of the path (a: with its loader processes; c: the driver, "
        "Ray's daemons and the workers). PSS, taken right after the training steps, splits shared pages between "
        "the processes that map them: it is the path's real footprint. The sum of each process's peak RSS "
        "(VmHWM) counts a shared page once per process that maps it. Helper CPU: cores used during the training "
        "steps by the path's other processes (a: the DataLoader workers; c: the driver and Ray's daemons and "
        "actors), taken from the cores the model trains on.",
        "",
        "Time to first step of c, by stage (medians, s): " + "; ".join(
            f"{workers} worker{'s' if workers > 1 else ''}: " + ", ".join(
                f"{stage} {statistics.median(r['stages_s'][stage] for r in runs[path]):.1f}"
                for stage in runs[path][0]["stages_s"]) for path, workers in (("c1", 1), ("c2", 2)))
        + ". To the worker's process: the driver's set-up (run-dir lease, dataset read and put into the object "
        "store) and Ray Train's start of its controller and worker processes. To the worker's dataset: the "
        "worker's Python start and imports (torch, Ray Train), Ray Train's process group, "
        "the zero-copy `ray.get`. To the end of the first step: model, DDP, the first step.",
        "",
        "## Goals on this machine",
        "",
        f"- b >= 1.2 x a in training throughput: b/a = {b_a:.2f}, {'met' if b_a >= 1.2 else 'MISSED'}",
        f"- c within 5 % of b: 1 worker c/b = {c1_b:.2f} ({'met' if c1_b >= 0.95 else 'MISSED'}), "
        f"2 workers c/b = {c2_b:.2f} ({'met' if c2_b >= 0.95 else 'MISSED'})",
        f"- Dataset shared, not copied per worker: the uint8 train+test arrays are {dataset_mib:.0f} MiB, put once "
        "into Ray's object store by the driver. With 2 workers, each maps "
        + " and ".join(f"{w['store_rss'] / MIB:,.0f}" for w in workers) + " MiB of that one copy (the pages its "
        "batches have touched so far; zero-copy `ray.get`), of which its proportional share (PSS) is "
        + " and ".join(f"{w['store_pss'] / MIB:,.0f}" for w in workers) + " MiB. Each worker's private memory "
        "(USS: torch, Ray, model, activations) is " + " and ".join(f"{w['uss'] / MIB:,.0f}" for w in workers)
        + f" MiB; a copy of the dataset per worker would add {dataset_mib:.0f} MiB to each.",
        "",
        "## Per repeat (train img/s)",
        "",
        "| repeat | " + " | ".join(PATHS) + " |",
        "|---|" + "---:|" * len(PATHS),
    ]
    for i in range(args.repeats):
        lines.append(f"| {i + 1} | " + " | ".join(f"{runs[p][i]['train_images_per_s']:,.0f}" for p in PATHS) + " |")
    epoch_s = {p: 50_000 / _median(runs[p], "train_images_per_s") + 10_000 / _median(runs[p], "eval_images_per_s")
               for p in PATHS}
    lines += ["", "## Projected full recipe", "",
              "200 epochs of 50,000 training + 10,000 test images at the median rates above: "
              + ", ".join(f"{p} {200 * epoch_s[p] / 3600:.1f} h" for p in PATHS) + ".",
              "", "## GPU", "",
              f"Measured on {host['gpu']} above." if host["gpu"] != "none" else
              "No GPU figures: no GPU was available to the run that generated this file.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The flags of a measurement (bench.scaling reuses them)."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes of path a")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "cifar10"))
    parser.add_argument("--batchnorm", default="global", choices=["global", "per_worker"],
                        help="what BatchNorm normalises over with 2 workers (bench.scaling compares the two)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.child:
        # Through the importable module, not __main__, so Ray pickles the worker hooks by reference.
        from bench import throughput

        run = {"a": throughput.run_plain, "b": throughput.run_engine, "c1": lambda a: throughput.run_ray(a, 1),
               "c2": lambda a: throughput.run_ray(a, 2)}
        print(RESULT_TAG + json.dumps(run[args.child](args)), flush=True)
        return 0

    host, start = machine(), time.perf_counter()
    runs: dict[str, list[dict]] = {path: [] for path in PATHS}
    for repeat in range(args.repeats):
        for path in PATHS:
            runs[path].append(run_child(path, args))
            last = runs[path][-1]
            print(f"repeat {repeat + 1}/{args.repeats} {path}: {last['train_images_per_s']:,.0f} train img/s, "
                  f"{last['eval_images_per_s']:,.0f} eval img/s", flush=True)
    report = render(args, host, runs, time.perf_counter() - start)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
