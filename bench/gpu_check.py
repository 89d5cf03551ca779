"""The GPU check: one command for a short GPU loan, about 8 minutes; rewrites its report after every measurement.

    PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --output $OUT/gpu_check.md      # from the repo root

Needs only torch (numpy, pyyaml, pyarrow, torchvision): it trains on synthetic CIFAR-shaped images made on the
spot (bench/synthetic.py) unless `--data DIR` names the real parquet files. In this order, the most decisive
first (bench/README.md):
  1. eager vs torch.compile vs CUDA graphs, ResNet-20/56/110 in bf16: the engine's img/s (core.loop.fit) next to
     the model alone (forward + backward + SGD step on pre-augmented batches), so the engine's overhead shows;
  2. 1, 2 and 4 processes training resnet20 at once on one GPU (torch only): their summed img/s;
  3. with Ray importable: a short Ray Train run and the sweep path's trials sharing the GPU (else "skipped: no Ray");
  4. the rows of 1 in the other precisions (fp32).
Every measurement runs in a process of its own, killed at `--limit-s` or at the end of `--budget-s`, whichever
comes first; a failure, a crash or a kill becomes that row's status and the check goes on. Without CUDA it runs
the same on the CPU (the CUDA-graph rows are n/a); tests/test_gpu_check.py does that with tiny sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_measure import ERROR_TAG
from bench.throughput import RESULT_TAG
from ray_resnet.io import environment

REPO = Path(__file__).resolve().parents[1]
MODE_NAMES = {"eager": "eager", "compiled": "compiled", "cuda-graphs": "compiled + CUDA graphs"}
NOT_YET = "not run yet"
MIN_START_S = 10  # a measurement with less budget left than this is not started: it could not finish
GO_DELAY_S = 0.5  # sharing processes start their timing window this long after the last one is ready
LOG_LINES = 40  # output lines of each measurement kept in the log


@dataclasses.dataclass
class Measurement:
    """One row of the report: what runs (one process per spec, all at once) and how it went."""

    group: str  # "modes" (the first precision's training rows), "share", "ray", "more" (other precisions)
    label: dict[str, str]  # the row's leading cells
    specs: list[dict]
    status: str = NOT_YET
    results: list[dict] = dataclasses.field(default_factory=list)  # per process: its results merged

    @property
    def title(self) -> str:
        return " ".join(self.label.values()) + (" processes at once" if self.group == "share" else "")


def training_row(args: argparse.Namespace, model: str, precision: str, mode: str, cuda: bool) -> Measurement:
    spec = {"kind": "train", "model": model, "precision": precision, "mode": MODE_NAMES[mode], "data": args.data,
            "warmup": args.warmup, "steps": args.steps, "eval_images": args.eval_images, "threads": threads(cuda, 1)}
    row = Measurement("modes" if precision == args.precisions[0] else "more",
                      {"model": model, "precision": precision, "mode": mode}, [spec])
    if mode == "cuda-graphs" and not cuda:
        row.status = "n/a: no CUDA"
    return row


def sharing_row(args: argparse.Namespace, processes: int, cuda: bool) -> Measurement:
    spec = {"kind": "share", "model": args.share_model, "precision": args.precisions[0], "mode": "eager",
            "data": args.data, "warmup": args.warmup, "train_images": args.share_images,
            "eval_images": args.eval_images, "window_s": args.window_s, "threads": threads(cuda, processes)}
    return Measurement("share", {"processes": str(processes)},
                       [{**spec, "rank": rank} for rank in range(processes)])


def ray_rows(args: argparse.Namespace, has_ray: bool) -> list[Measurement]:
    base = {"ray": True, "data": args.data, "train_images": args.ray_images, "eval_images": args.eval_images,
            "epochs": args.ray_epochs}
    rows = [Measurement("ray", {"step": f"short Ray Train run: resnet20, {args.ray_epochs} epochs, 1 worker"},
                        [{**base, "kind": "ray_run"}])]
    rows += [Measurement("ray", {"step": f"sweep path: {trials} resnet20 trials at once"},
                         [{**base, "kind": "ray_sweep", "trials": trials}]) for trials in args.trials]
    for row in rows:
        row.status = NOT_YET if has_ray else "skipped: no Ray"
    return rows


def threads(cuda: bool, processes: int) -> int:
    """torch threads of each process, as Ray gives a worker: 1 CPU with a GPU, else the CPUs split evenly."""
    return 1 if cuda else max(1, (os.cpu_count() or 1) // processes)


def build_plan(args: argparse.Namespace, cuda: bool, has_ray: bool) -> list[Measurement]:
    first, *others = args.precisions
    plan = [training_row(args, model, first, mode, cuda) for model in args.models for mode in args.modes]
    plan += [sharing_row(args, processes, cuda) for processes in args.processes]
    plan += ray_rows(args, has_ray)
    plan += [training_row(args, model, precision, mode, cuda)
             for precision in others for model in args.models for mode in args.modes]
    return plan


# ------------------------------------------------------------------------------------------ running one


def start_process(spec: dict, output: Path) -> subprocess.Popen:
    """`python -m bench.gpu_measure spec` in a session of its own (so a kill reaches everything it started)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    if "threads" in spec:  # a process standing for a Ray worker (Ray steps leave it to Ray)
        env["OMP_NUM_THREADS"] = str(spec["threads"])  # Ray sets it to a worker's CPUs
    with open(output, "w") as sink:
        return subprocess.Popen([sys.executable, "-m", "bench.gpu_measure", json.dumps(spec)], cwd=REPO, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_all(processes: list[subprocess.Popen], sync_dir: Path, limit_s: float) -> bool:
    """Waits for the processes; writes the go time into `sync_dir` once all are ready (sharing); kills all at
    `limit_s` or as soon as one fails. True if they ran past the limit."""
    deadline, go = time.monotonic() + limit_s, sync_dir / "go"
    while any(p.poll() is None for p in processes):
        if any(p.returncode not in (None, 0) for p in processes) or time.monotonic() > deadline:
            for p in processes:
                kill(p)
            return time.monotonic() > deadline
        if not go.exists() and all((sync_dir / f"ready{i}").exists() for i in range(len(processes))):
            go.write_text(str(time.time() + GO_DELAY_S))
        time.sleep(0.05)
    return False


def read_output(output: Path, returncode: int) -> tuple[dict, str | None, list[str]]:
    """(merged results, the error line or None, the lines for the log) of one process's output."""
    results, error, lines = {}, None, []
    for line in output.read_text(errors="replace").splitlines():
        if line.startswith(RESULT_TAG):
            results.update(json.loads(line[len(RESULT_TAG):]))
        elif line.startswith(ERROR_TAG):
            error = line[len(ERROR_TAG):]
        elif line.strip():
            lines.append(line)
    if returncode != 0 and error is None:  # killed, or crashed below Python (a CUDA fault, a segfault)
        error = f"exit {returncode}" + (f": {lines[-1].strip()[:300]}" if lines else "")
    return results, error, lines


def run(row: Measurement, limit_s: float, budget_cut: bool, log: Path) -> None:
    """Runs `row`'s processes at once, at most `limit_s`; fills in its results and status, appends to `log`."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        scratch = Path(scratch)
        specs = [{**spec, "sync_dir": str(scratch)} for spec in row.specs]
        processes = [start_process(spec, scratch / f"out{i}") for i, spec in enumerate(specs)]
        timed_out = wait_all(processes, scratch, limit_s)
        for process in processes:  # what a finished process left behind too (compile workers, Ray's daemons)
            kill(process)
        outputs = [read_output(scratch / f"out{i}", p.returncode) for i, p in enumerate(processes)]
    wall = time.perf_counter() - start
    row.results = [results for results, _, _ in outputs]
    # a process this check killed because another failed comes last: the other's error is the row's
    killed = f"exit -{int(signal.SIGKILL)}"
    errors = sorted((error for _, error, _ in outputs if error), key=lambda error: error.startswith(killed))
    if timed_out:
        row.status = f"timeout: killed after {limit_s:.0f} s" + (" (end of the budget)" if budget_cut else "")
    elif errors:
        row.status = "error: " + errors[0].replace("|", "/")
    else:
        row.status = f"ok ({wall:.0f} s)"
    with open(log, "a") as f:
        f.write(f"\n## {row.title}: {row.status}\n")
        for i, (_, _, lines) in enumerate(outputs):
            f.write(f"--- process {i}, last {LOG_LINES} lines\n" + "\n".join(lines[-LOG_LINES:]) + "\n")


# ------------------------------------------------------------------------------------------- the report


def number(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def training_table(rows: list[Measurement]) -> list[str]:
    lines = ["| model | precision | mode | engine img/s | model-only img/s | engine / model only | first step (s) "
             "| peak GPU MiB | status |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        r = row.results[0] if row.results else {}
        ratio = r["engine"] / r["model_only"] if "engine" in r and "model_only" in r else None
        lines.append(f"| {' | '.join(row.label.values())} | {number(r.get('engine'))} | "
                     f"{number(r.get('model_only'))} | {number(ratio, 2)} | {number(r.get('first_step_s'), 1)} | "
                     f"{number(r.get('peak_mib'))} | {row.status} |")
    return lines


def sharing_table(rows: list[Measurement]) -> list[str]:
    def summed(row: Measurement) -> float | None:
        rates = [r.get("images_per_s") for r in row.results]
        return sum(rates) if rates and None not in rates else None

    alone = next((summed(row) for row in rows if row.label["processes"] == "1"), None)
    lines = ["| processes | summed img/s | per process (median) | vs 1 process | status |", "|---:|---:|---:|---:|---|"]
    for row in rows:
        total = summed(row)
        per = statistics.median(r["images_per_s"] for r in row.results) if total is not None else None
        lines.append(f"| {row.label['processes']} | {number(total)} | {number(per)} | "
                     f"{number(total / alone if total and alone else None, 2)} | {row.status} |")
    return lines


def ray_table(rows: list[Measurement]) -> list[str]:
    lines = ["| step | result | status |", "|---|---|---|"]
    for row in rows:
        r = row.results[0] if row.results else {}
        if "test_acc" in r:
            result = f"test accuracy {r['test_acc']:.2f} %, {r['wall_s']:.0f} s"
        elif "images_per_s" in r:
            result = (f"{r['at_once']} at once, {r['finished']} finished; summed {r['images_per_s']:,.0f} img/s, "
                      f"{r['per_trial']:,.0f} per trial")
        else:
            result = ""
        lines.append(f"| {row.label['step']} | {result} | {row.status} |")
    return lines


def header(args: argparse.Namespace, host: dict, plan: list[Measurement], elapsed_s: float, done: bool) -> list[str]:
    finished = sum(row.status != NOT_YET for row in plan)
    progress = (f"finished in {elapsed_s:.0f} s" if done else
                f"RUNNING or cut off: {finished} of {len(plan)} rows settled after {elapsed_s:.0f} s")
    lines = ["# GPU check", "", "`python -m bench.gpu_check " + " ".join(sys.argv[1:]) + f"`: {progress} "
             f"(budget {args.budget_s:.0f} s, each measurement at most {args.limit_s:.0f} s).", ""]
    if not host["cuda"]:
        lines += ["**No GPU: no CUDA device (torch.cuda.is_available() is False); every figure below is from the "
                  "CPU.**", ""]
    data = (f"real CIFAR-10 from {args.data}" if args.data else
            "synthetic CIFAR-shaped uint8 images (bench/synthetic.py; speed does not depend on the pixels)")
    return lines + [f"- Machine: GPU {host['gpu']}; CPU {host['cpu']}, {host['cores']} cores",
                    f"- Software: {host['software']}", f"- Data: {data}",
                    f"- Each process is set up as a Ray Train worker: torch threads and OMP_NUM_THREADS = its CPUs "
                    f"(1 per process with a GPU), cudnn.benchmark on with CUDA; batch 128, channels_last, the "
                    f"default recipe; {args.warmup} warm-up + {args.steps} timed steps", ""]


def render(args: argparse.Namespace, host: dict, plan: list[Measurement], elapsed_s: float, done: bool) -> str:
    groups = {g: [row for row in plan if row.group == g] for g in ("modes", "share", "ray", "more")}
    lines = header(args, host, plan, elapsed_s, done)
    lines += [f"## 1. Eager vs compiled vs CUDA graphs ({args.precisions[0]}), and the engine vs the model alone",
              "", "Engine: core.loop.fit, one epoch with GPU augmentation and the test evaluation after it. Model "
              "only: forward + backward + SGD step of the same (compiled) model on pre-augmented batches. First "
              "step: from building the model to the end of its first step, compilation included (compile caches "
              "under /tmp are shared by the rows, so a later row can compile faster than a cold start).", "",
              *training_table(groups["modes"]), "",
              f"## 2. Processes training {args.share_model} at once on one GPU (torch only, no Ray)", "",
              f"Each process: the engine, eager, {args.precisions[0]}, with its own copy of the data; timed together "
              f"over a {args.window_s:.0f} s window after every process's warm-up.", "",
              *sharing_table(groups["share"]), "", "## 3. Ray", "",
              f"The short run: {args.ray_images} training images (raytrain.driver.run_training). The sweep path "
              "(raytrain.sweep.run_sweep): each trial 1 worker with 1/trials of the GPU (without one: 1 CPU), "
              "img/s of the last epoch summed over the trials."
              + ("" if args.data else " On synthetic images the accuracy is chance (10 %): real-data accuracy is "
                 "a cluster run's."), "", *ray_table(groups["ray"]), ""]
    if groups["more"]:
        lines += ["## 4. Other precisions", "", *training_table(groups["more"]), ""]
    return "\n".join(lines) + "\n"


def describe_host(cuda: bool, has_ray: bool) -> dict:
    gpus = environment.node_gpus()  # nvidia-smi: no CUDA context in this process, which only waits
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    if cuda:
        versions += [f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}"]
    versions.append(f"ray {environment.package_version('ray')}" if has_ray else "Ray not importable")
    return {"cuda": cuda, "gpu": ", ".join(gpus) or ("CUDA device" if cuda else "none"),
            "cpu": environment.cpu_model(), "cores": os.cpu_count(), "software": ", ".join(versions)}


# ------------------------------------------------------------------------------------------- the driver


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check.md",
                        help="the report (markdown), rewritten after every measurement; the log goes next to it")
    parser.add_argument("--budget-s", type=float, default=480, help="all measurements end within this many seconds")
    parser.add_argument("--limit-s", type=float, default=150, help="a measurement is killed after this many seconds")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    parser.add_argument("--modes", nargs="+", default=list(MODE_NAMES), choices=list(MODE_NAMES))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"],
                        help="the first in section 1, the others at the end")
    parser.add_argument("--steps", type=int, default=100, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, graph capture)")
    parser.add_argument("--eval-images", type=int, default=1000, help="test images of every measurement")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4], help="processes sharing the GPU")
    parser.add_argument("--share-model", default="resnet20")
    parser.add_argument("--share-images", type=int, default=50_000, help="training images of each sharing process")
    parser.add_argument("--window-s", type=float, default=10, help="how long the sharing processes are timed")
    parser.add_argument("--ray-epochs", type=int, default=2)
    parser.add_argument("--ray-images", type=int, default=10_000, help="training images of the Ray steps")
    parser.add_argument("--trials", nargs="+", type=int, default=[1, 2, 4], help="sweep trials sharing the GPU")
    parser.add_argument("--data", help="real CIFAR-10 (parquet or torchvision's batches); default: synthetic")
    return parser


def write(path: Path, text: str) -> None:
    """Replaces `path` whole, so a kill at any moment leaves the last complete report."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.warmup, args.steps) < 1 or min(args.processes + args.trials) < 1:
        parser.error("--warmup, --steps, --processes and --trials must be at least 1")
    args.data = str(Path(args.data).resolve()) if args.data else None
    cuda, has_ray = torch.cuda.is_available(), importlib.util.find_spec("ray") is not None
    start, host = time.perf_counter(), describe_host(cuda, has_ray)
    plan, log = build_plan(args, cuda, has_ray), args.output.with_suffix(".log")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"# GPU check log: each measurement's last {LOG_LINES} output lines\n")
    write(args.output, render(args, host, plan, 0, False))
    for row in (row for row in plan if row.status == NOT_YET):
        left = args.budget_s - (time.perf_counter() - start)
        if left < MIN_START_S:
            row.status = f"not run: over the {args.budget_s:.0f} s budget"
            continue
        print(f"[gpu_check {time.perf_counter() - start:4.0f}s] {row.title}", flush=True)
        run(row, min(args.limit_s, left), left < args.limit_s, log)
        print(f"[gpu_check {time.perf_counter() - start:4.0f}s]   {row.status}", flush=True)
        write(args.output, render(args, host, plan, time.perf_counter() - start, False))
    report = render(args, host, plan, time.perf_counter() - start, True)
    write(args.output, report)
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
