"""What a run costs per epoch besides training and evaluating: the checkpoint save, its upload, best/, tb/ and the
report barrier, through the real Ray Train path; writes bench/EPOCH_OVERHEAD.md.

    PYTHONPATH=. python bench/epoch_overhead.py                                # from the repo root
    PYTHONPATH=. python bench/epoch_overhead.py --baseline /path/to/other/checkout   # also that code's numbers

Each run trains `--epochs` tiny epochs (a class-balanced slice of CIFAR-10: `--train-images` training and 200 test
images) of ResNet-20 with 1 worker, into a local run dir or an S3 one (a moto server on 127.0.0.1). A `fit` hook on
rank 0, run after every other hook (Ray's report included), stamps every epoch's end; an epoch's overhead is the
time between two stamps minus the epoch's own train+eval time (its `epoch_time_s`). The first epoch is left out
(one-time costs), so with `run.checkpoint_every_min` the figures are those of epochs that take no checkpoint.
Medians over the epochs of a run, then over `--repeats` runs (interleaved across the variants). `--baseline`
runs the every-epoch variants again with another checkout's ray_resnet (e.g. before this bench existed), in a
subprocess, on the same Ray settings and data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAMPS_ENV = "EPOCH_OVERHEAD_STAMPS"  # the file rank 0 appends "epoch end_time epoch_time_s" lines to
RESULT_TAG = "RESULT "
VARIANTS = {  # name -> (storage kind, extra --set assignments)
    "local, checkpoint every epoch (default)": ("local", []),
    "local, run.checkpoint_every_min=10": ("local", ["run.checkpoint_every_min=10"]),
    "S3, checkpoint every epoch (default)": ("s3", []),
    "S3, run.checkpoint_every_min=10": ("s3", ["run.checkpoint_every_min=10"]),
}
BASELINE_VARIANTS = [name for name, (_, sets) in VARIANTS.items() if not sets]  # keys any version knows

from ray_resnet.core.loop import Hooks  # noqa: E402 (after REPO: run as a script, PYTHONPATH names the checkout)


class EpochStamps(Hooks):
    """Rank 0 appends each epoch's end time and its train+eval time to the file $EPOCH_OVERHEAD_STAMPS."""

    def __init__(self):
        import ray.train

        self.rank0 = ray.train.get_context().get_world_rank() == 0

    def epoch_end(self, metrics: dict) -> None:
        if self.rank0:
            with open(os.environ[STAMPS_ENV], "a") as f:
                f.write(f"{metrics['epoch']} {time.perf_counter()} {metrics['epoch_time_s']}\n")


def overheads(stamps: list[tuple[int, float, float]]) -> list[float]:
    """Per epoch after the first: the time since the previous epoch's stamp less its own train+eval time."""
    return [(t - prev_t) - train_eval for (_, prev_t, _), (_, t, train_eval) in zip(stamps, stamps[1:])]


def small_cifar(root: Path, source: Path, train_rows: int = 1024, test_rows: int = 500) -> Path:
    """The first rows of the CIFAR-10 parquet files, in the same layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        batch = next(pq.ParquetFile(source / f"{split}.parquet").iter_batches(batch_size=rows))
        pq.write_table(pa.Table.from_batches([batch]), root / f"{split}.parquet")
    return root


def one_run(args: argparse.Namespace, variant: str, storage: str, data: Path, name: str) -> list[float]:
    """Train one run of `variant`; its per-epoch overheads (seconds)."""
    from ray_resnet.config import load_config
    from ray_resnet.raytrain.driver import run_training

    sets = [f"data.root={data}", f"run.storage={storage}", f"run.name={name}", f"schedule.epochs={args.epochs}",
            f"data.train_subset={args.train_images}", "data.test_subset=200", "optim.batch_size=128",
            "schedule.warmup_epochs=0", "schedule.milestones=[]", "perf.eval_batch_size=200", *VARIANTS[variant][1]]
    stamps_file = Path(os.environ[STAMPS_ENV])
    stamps_file.write_text("")
    run_training(load_config(None, sets), worker_hooks=lambda: [EpochStamps()])
    stamps = [(int(e), float(t), float(s)) for e, t, s in (line.split() for line in stamps_file.read_text().split("\n")
                                                            if line)]
    return overheads(stamps)


def measure(args: argparse.Namespace, variants: list[str], s3_env: dict) -> dict[str, list[list[float]]]:
    """Per variant, per repeat, the per-epoch overheads; one Ray session for all runs."""
    import ray

    from ray_resnet.raytrain.cluster import RAY_SETTINGS

    work = Path(tempfile.mkdtemp(prefix="epoch-overhead-"))
    os.environ.update({**{k: v for k, v in RAY_SETTINGS.items() if k not in os.environ}, **s3_env,
                       STAMPS_ENV: str(work / "stamps")})
    data = small_cifar(work / "cifar10", Path(args.data))
    s3_keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
               "AWS_EC2_METADATA_DISABLED")  # a child gets them in its environment, the workers from here
    env_vars = {k: os.environ[k] for k in [*RAY_SETTINGS, *s3_keys, STAMPS_ENV, "PYTHONPATH"] if k in os.environ}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env_vars})
    runs: dict[str, list[list[float]]] = {v: [] for v in variants}
    try:
        for repeat in range(args.repeats):
            for variant in variants:
                storage = str(work / "runs") if VARIANTS[variant][0] == "local" else f"s3://{args.bucket}/bench"
                runs[variant].append(one_run(args, variant, storage, data, f"r{repeat}-{len(runs[variant])}-"
                                             f"{variants.index(variant)}-{os.getpid()}"))
                print(f"repeat {repeat + 1}/{args.repeats} {variant}: median overhead "
                      f"{statistics.median(runs[variant][-1]):.3f} s/epoch", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return runs


def baseline(args: argparse.Namespace, s3_env: dict) -> dict[str, list[list[float]]]:
    """The every-epoch variants with the ray_resnet of `args.baseline`, in a subprocess."""
    env = {**os.environ, **s3_env, "PYTHONPATH": str(Path(args.baseline).resolve())}
    command = [sys.executable, __file__, "--child", "--epochs", str(args.epochs), "--repeats", str(args.repeats),
               "--train-images", str(args.train_images), "--data", args.data, "--bucket", args.bucket]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, cwd=tempfile.gettempdir())
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"the baseline run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def git_commit(path: Path) -> str:
    done = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return done.stdout.strip()[:100] or "unknown"


def render(args: argparse.Namespace, runs: dict, base: dict | None, wall_s: float) -> str:
    from ray_resnet.io.environment import cpu_model

    def row(label: str, per_repeat: list[list[float]]) -> str:
        medians = [statistics.median(r) for r in per_repeat]
        return (f"| {label} | {statistics.median(medians):.3f} | "
                f"{' / '.join(f'{m:.3f}' for m in medians)} | {sum(len(r) for r in per_repeat)} |")

    lines = [
        "# Per-epoch overhead: checkpoint, upload, best/, tb/ and report, besides train + eval", "",
        f"Generated by `PYTHONPATH=. python bench/epoch_overhead.py{' --baseline ' + args.baseline if base else ''}`"
        f" in {wall_s / 60:.1f} min; do not edit by hand.", "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, no GPU; load average (1/5/15 min) "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end (other users' work shares the cores)",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; code: {git_commit(REPO)}",
        f"- Workload: ResNet-20, 1 Ray Train worker, {args.epochs} epochs of {args.train_images} training images "
        "(batch 128) + 200 test images; S3 is a moto server on 127.0.0.1 (no network latency: a real bucket adds "
        "tens of ms per request); repeats: " f"{args.repeats}, interleaved.",
        "- Overhead of an epoch: the time between two consecutive epoch ends (after Ray's report) minus that "
        "epoch's train+eval time; epochs 2.." f"{args.epochs}; median over a run's epochs, then over the repeats.",
        "", "| code, run dir, checkpoints | overhead (s/epoch, median) | per repeat | epochs |", "|---|---:|---|---:|"]
    lines += [row(f"this code: {variant}", per_repeat) for variant, per_repeat in runs.items()]
    if base:
        lines += [row(f"baseline ({git_commit(Path(args.baseline))}): {variant}", per_repeat)
                  for variant, per_repeat in base.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "cifar10"), help="CIFAR-10 parquet dir")
    parser.add_argument("--baseline", help="another checkout whose ray_resnet to measure too")
    parser.add_argument("--bucket", default="ray-resnet", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "EPOCH_OVERHEAD.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.child:  # the S3 settings came in the environment
        print(RESULT_TAG + json.dumps(measure(args, BASELINE_VARIANTS, {})), flush=True)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import BUCKET, S3Server

    start, server = time.perf_counter(), S3Server(Path(tempfile.mkdtemp(prefix="moto-")) / "moto.log")
    try:
        server.client().create_bucket(Bucket=BUCKET)
        runs = measure(args, list(VARIANTS), server.env)
        base = baseline(args, server.env) if args.baseline else None
    finally:
        server.stop()
    report = render(args, runs, base, time.perf_counter() - start)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
