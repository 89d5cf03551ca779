"""Where a run's Ray processes run (Ray): joining or starting Ray, the runtime env every process gets, and the
workers' resources, checked against the cluster before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import NamedTuple

import ray
import ray.train
import ray.train.torch

from ray_resnet.config import Config
from ray_resnet.errors import ConfigError, RunError
from ray_resnet.io import storage

# How the Ray processes of a run or sweep behave (an environment variable set where the run starts wins):
RAY_SETTINGS = {
    # report() waits up to this long (seconds) for the controller's poll (Ray's default 2 s)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else every worker print() shows up twice; rank 0 prints its own lines
    # Tune's JSON and TensorBoard loggers would write a result.json and a second TensorBoard run into each trial
    # dir, which is also the Train run dir: a sweep keeps only its progress.csv (CSVLoggerCallback)
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # a trial resumed after its Train run had saved the last epoch has nothing left to report; Tune's strict check
    # would count that as an error
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
}


# Environment variables passed on by name prefix: how NCCL (NCCL_SOCKET_IFNAME, NCCL_DEBUG, NCCL_IB_DISABLE, ...) and
# torch's NCCL process group (TORCH_NCCL_BLOCKING_WAIT, ...) behave. Set where the run starts, they reach every
# worker, on any node. CUDA_* stays out: Ray gives each worker its own CUDA_VISIBLE_DEVICES (a driver's, on a
# CPU-only head, would hide the workers' GPUs), and the rest are per-node settings.
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_")


class WorkerResources(NamedTuple):
    use_gpu: bool
    bundle: dict[str, float]  # Ray resources per worker
    threads: int  # torch threads per worker: its CPUs


@contextlib.contextmanager
def ray_settings() -> Iterator[dict[str, str]]:
    """RAY_SETTINGS in this process's environment while it drives Ray (Ray Train and Tune read them here and pass
    them to the processes they start); the environment is as it was afterwards."""
    added = {k: v for k, v in RAY_SETTINGS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield {k: os.environ[k] for k in RAY_SETTINGS}
    finally:
        for key in added:
            os.environ.pop(key, None)


# Ray Train's bound (seconds) on each start of a worker group, read by its controller, which gets it from the
# environment of the process that calls fit (Ray 2.60: 60 s, and a start that times out is retried, forever).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def start_timeout(cfg: Config) -> Iterator[None]:
    """run.start_timeout_s as Ray Train's start timeout while a fixed-size run's trainer is made and fit; the
    environment is as it was afterwards. The key wins over a START_TIMEOUT_ENV set where the run starts (a note
    says so): the run's one-line error names the key and the value that bounded it. An elastic run keeps Ray's
    timeout: its starts at a size that no longer fits (a node just lost) are retried at the size that does."""
    if cfg.run.elastic:
        yield
        return
    before, value = os.environ.get(START_TIMEOUT_ENV), str(cfg.run.start_timeout_s)
    if before is not None and before != value:
        print(f"note: {START_TIMEOUT_ENV}={before} is replaced by run.start_timeout_s={value} for this run",
              flush=True)
    os.environ[START_TIMEOUT_ENV] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before


def connect(address: str | None) -> None:
    """Join `address` (or $RAY_ADDRESS, which `ray job submit` sets), else start a local embedded Ray."""
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", runtime_env=shared_environment())


def shared_environment() -> dict:
    """The runtime env every Ray process of the run gets, on any node: RAY_SETTINGS, where the object store is
    (AWS_ENDPOINT_URL, ...) and the NCCL settings (FORWARDED_PREFIXES). Never credentials: each node has its own
    (an instance role, or the environment its `ray start` ran in). Keys a submitted job's own runtime env sets are
    left to it (Ray refuses two values for one key)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    taken = job.get("env_vars") or {}
    names = [*RAY_SETTINGS, *storage.ENDPOINT_ENV, *(k for k in os.environ if k.startswith(FORWARDED_PREFIXES))]
    shared = {k: os.environ[k] for k in names if k in os.environ and k not in taken}
    return {"env_vars": shared} if shared else {}


def plan_resources(cfg: Config) -> WorkerResources:
    """What each worker gets; fails at once if the workers cannot fit.

    Ray Train would otherwise wait forever for a worker group the cluster can never place.
    """
    least, most = cfg.run.worker_range
    if cfg.run.autoscaling:  # the nodes come when the workers ask; Ray Train waits for them
        use_gpu = cfg.run.device != "cpu"
        bundle = {"CPU": cfg.run.cpus_per_worker or 1, **({"GPU": cfg.run.gpus_per_worker} if use_gpu else {})}
        _check_gpu_sharing(cfg, use_gpu)
        _check_gpu_compile(cfg, use_gpu)
        return WorkerResources(use_gpu, bundle, int(bundle["CPU"]))
    total = ray.cluster_resources()
    use_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and total.get("GPU", 0) > 0)
    _check_gpu_sharing(cfg, use_gpu)
    _check_gpu_compile(cfg, use_gpu)
    if use_gpu:
        bundle = {"CPU": cfg.run.cpus_per_worker or 1, "GPU": cfg.run.gpus_per_worker}
    else:
        bundle = {"CPU": cfg.run.cpus_per_worker or max(1, int(total.get("CPU", 1)) // most)}
    places = worker_slots(bundle, placement=cfg.run.placement_strategy)
    if places < least:  # an elastic run starts once its minimum fits
        have = ", ".join(f"{k}={total.get(k, 0):g}" for k in bundle)
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        raise RunError(f"{least} worker(s) x {bundle} do not fit on this cluster ({have} over {nodes} node(s), "
                       f"{cfg.run.placement_strategy}; room for {places}): lower --num-workers or "
                       "run.cpus_per_worker, or add nodes")
    return WorkerResources(use_gpu, bundle, int(bundle["CPU"]))


def _check_gpu_sharing(cfg: Config, use_gpu: bool) -> None:
    """Two ranks of one run on one GPU make NCCL fail ("Duplicate GPU detected"), after the workers started."""
    if use_gpu and cfg.run.gpus_per_worker < 1 and cfg.run.worker_range[1] > 1:
        raise ConfigError(f"run.gpus_per_worker={cfg.run.gpus_per_worker:g} with run.num_workers="
                          f"{cfg.run.workers_text} could put two ranks of this run on one GPU, which NCCL refuses: "
                          "use run.gpus_per_worker=1 for a multi-worker run (fractions pack one-worker sweep "
                          "trials onto a GPU)")


def _check_gpu_compile(cfg: Config, use_gpu: bool) -> None:
    """torch.compile with DDP and BatchNorm across GPUs has open torch issues (graph breaks, compile errors) and has
    not run here: refused before any worker starts, rather than failing or silently slowing every rank."""
    if use_gpu and cfg.perf.compile == "on" and cfg.run.worker_range[1] > 1:
        raise ConfigError(f"perf.compile=on with run.num_workers={cfg.run.workers_text} GPU workers has not been run "
                          "yet: use perf.compile=auto (eager with several GPU workers, compiled with one) or "
                          "run.num_workers=1")


# Ray counts resources in fixed point, 1/10000 of a unit, so 0.1 GPU fits 10 times into 1 (as floats, 1.0 // 0.1
# is 9.0).
RESOURCE_UNITS = 10_000


def worker_slots(bundle: dict[str, float], nodes: list[dict[str, float]] | None = None,
                 placement: str = "PACK") -> int:
    """How many workers of `bundle` the nodes (default: the cluster's live nodes, as resource dicts) can hold at
    once under a placement strategy (a worker never spans nodes; STRICT_SPREAD: one per node, STRICT_PACK: all on
    one node)."""
    nodes = nodes if nodes is not None else [node["Resources"] for node in ray.nodes() if node["Alive"]]
    per_node = [min(round(node.get(k, 0) * RESOURCE_UNITS) // round(v * RESOURCE_UNITS) for k, v in bundle.items())
                for node in nodes]
    if placement == "STRICT_SPREAD":
        return sum(1 for slots in per_node if slots)
    if placement == "STRICT_PACK":
        return max(per_node, default=0)
    return sum(per_node)
