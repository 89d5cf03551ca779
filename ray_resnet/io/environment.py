"""Where a run ran (pure: no Ray): the facts its run dir's environment.json records, so results from different
machines can be compared. Gathering a fact never fails a run: what cannot be found is recorded as null.

The driver records each attempt (software, command line, its own machine); rank 0 adds every worker group that
trained in it (each rank's node, CPU and GPU), since on a cluster the driver may be a CPU-only head node and an
elastic or restarted run may change its workers.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

# git and nvidia-smi answer in well under a second; a hung one (a network file system) must not hold up a run.
COMMAND_TIMEOUT_S = 10
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout's root when imported from one


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _run(*argv: str) -> str | None:
    """A command's stdout (stripped), or None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(root: Path = PACKAGE_ROOT) -> dict | None:
    """{"commit", "dirty"} of the checkout the package is imported from; None for an installed copy (also one that
    lies inside some other repository) or without git. dirty: tracked files differ from the commit."""
    top = _run("git", "-C", str(root), "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _run("git", "-C", str(root), "rev-parse", "HEAD")
    changes = _run("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(changes)} if commit else None


# The x86 units that set a CPU's training speed and precision (`perf.amp: auto` trains in bf16 on AMX), by their
# /proc/cpuinfo flag; a virtual machine may show only "AMD EPYC" as its model name, for CPUs with and without them.
CPU_UNITS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name and, on x86, its vector and matrix units: "AMD EPYC (AVX2, AVX-512, AVX512-BF16)" (Linux:
    /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}
    name = next((v for k, v in fields.items() if k in ("model name", "Model", "Hardware") and v), None)  # x86; ARM
    flags = set(fields.get("flags", "").split())
    units = [unit for flag, unit in CPU_UNITS.items() if flag in flags]
    if name and units:
        return f"{name} ({', '.join(units)})"
    return name or platform.processor() or platform.machine() or None


def node_gpus() -> list[str]:
    """The names of this node's NVIDIA GPUs, from nvidia-smi ([] without it). Never through torch.cuda, which
    would give the driver process a CUDA context on a GPU the workers need."""
    names = _run("nvidia-smi", "--query-gpu=name", "--format=csv,noheader")
    return [name.strip() for name in names.splitlines() if name.strip()] if names else []


def machine() -> dict:
    """This node: host name, OS, CPU model, logical CPUs, GPU names."""
    return {"host": socket.gethostname(), "os": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "gpus": node_gpus()}


def software() -> dict:
    """ray-resnet's version (and git commit, run from a checkout), Python's, torch's and Ray's (read without
    importing Ray)."""
    return {"ray_resnet": package_version("ray-resnet"), "git": git_state(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": package_version("ray")}


def attempt(argv: list[str], num_workers: int | list[int]) -> dict:
    """The driver's record of one attempt at a run (a first start or a resume), before its workers start."""
    return {"started": now_utc(), "command": list(argv), **software(), "num_workers": num_workers,
            "driver": machine(), "worker_groups": []}


def worker(rank: int, node_id: str, device: torch.device, precision: str) -> dict:
    """One rank's facts: its node, CPU, torch threads, the GPU it trains on (None on CPU) and the precision of its
    training steps (perf.amp auto resolves per machine)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"rank": rank, "node_id": node_id, "host": socket.gethostname(), "cpu": cpu_model(),
            "threads": torch.get_num_threads(), "device": str(device), "gpu": gpu, "precision": precision}


def worker_group(ranks: list[dict]) -> dict:
    """A worker group (the ranks of one start of the workers: the first, or after a restart or a resize)."""
    gpus = [r["gpu"] for r in ranks if r["gpu"]]
    return {"started": now_utc(), "workers": len(ranks), "gpus": len(gpus), "ranks": ranks}


def _group_traits(group: dict) -> dict[str, str]:
    ranks = group.get("ranks", [])
    return {"workers": str(group.get("workers", len(ranks))),
            "precision": "/".join(sorted({str(r.get("precision")) for r in ranks})),
            "device": "/".join(sorted({str(r.get("device", "")).split(":")[0] for r in ranks}))}


def group_change(before: dict, after: dict) -> str | None:
    """How worker group `after` differs from `before` in worker count, training precision and device kind, in
    words ("workers 1 -> 2, precision bf16 -> fp32"); None if in none of them."""
    old, new = _group_traits(before), _group_traits(after)
    changed = [f"{key} {old[key]} -> {new[key]}" for key in new if old[key] != new[key]]
    return ", ".join(changed) or None
