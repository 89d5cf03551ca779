"""The Ray edge of training: the per-worker adapter that runs `fit.fit` under Ray Train's `TorchTrainer`, and the
driver that starts it (`run_training`). The loop itself is pure PyTorch; the lines marked `[Ray n]` are what Ray
Train adds, numbered as in Ray's own examples. The run dir's layout is in rundir.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from . import config as config_lib
from . import environment, storage
from .checkpoint import (Progress, best_checkpoint, load_checkpoint, restore_training_state, save_checkpoint,
                         sync_best)
from .config import Config
from .constants import BEST_DIR, TB_DIR
from .data import load_cifar
from .engine import training_precision
from .errors import ConfigError, RunError, UserError
from .failures import fit_or_explain
from .fit import Hooks, Splits, build_training, fit, select_splits, selection_metric, steps_per_epoch
from .rundir import (check_resumable, diverged_error, previous_result, record_attempt, record_duration,
                     record_worker_group, resolve_run, run_dir, write_config, write_result)
from .runlog import RunLog, progress_every_s

# report() waits up to this long for the controller's poll (Ray's default 2 s); printing is done by rank 0 itself.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every worker print() shows up twice
RAY_SETTINGS = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PRINT_PATCH")
# How gloo and NCCL collectives fail on the surviving ranks when another rank's process is gone, and how long a
# survivor waits (seconds) before reporting that, so Ray sees the lost rank's own death first.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")
PEER_LOST_WAIT_S = 30


def load_dataset(cfg: Config) -> dict[str, np.ndarray]:
    """The decoded uint8 train and test arrays, whole (workers pick their subsets), as numpy so that ray.put
    shares them zero-copy between the workers of a node."""
    out = {}
    for split in ("train", "test"):
        images, labels = load_cifar(cfg.data.root, split, cfg.data.dataset, cfg.data.download, cfg.data.cache_dir)
        out[f"{split}_images"], out[f"{split}_labels"] = images.numpy(), labels.numpy()
    return out


def check_split_fits(cfg: Config, num_train: int) -> None:
    left, workers = num_train - (cfg.data.val_split or 0), cfg.run.worker_range[1]
    if left < 1:
        raise ConfigError(f"data.val_split={cfg.data.val_split} holds out all {num_train} training images under "
                          f"{cfg.data.root}: hold out fewer")
    used = min(cfg.data.train_subset or left, left)
    if used < workers:
        raise ConfigError(f"{used} training images cannot be split across run.num_workers={cfg.run.workers_text} "
                          "workers: use fewer workers or more data")


def _worker_splits(cfg: Config, arrays: dict[str, np.ndarray], device: torch.device) -> Splits:
    with warnings.catch_warnings():  # arrays from the object store are read-only; we only ever index them
        warnings.simplefilter("ignore", UserWarning)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if device.type == "cuda":  # the whole uint8 set fits on the GPU (150 MB): no per-step host transfers
        tensors = {k: v.to(device) for k, v in tensors.items()}
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: pick the fastest conv kernels once
    return select_splits(cfg, tensors)


def _quiet_ray_train_logs() -> None:
    # At INFO these repeat every report's metrics dict and checkpoint path; rank 0 prints its own epoch line.
    # (The controller's logs, e.g. why a worker group was restarted, stay at INFO.)
    for module in ("context", "storage"):  # Ray-internal modules, already imported in a worker; absent: no-op
        logger = getattr(sys.modules.get(f"ray.train.v2._internal.execution.{module}"), "logger", None)
        if logger:
            logger.setLevel(logging.WARNING)


def _restore(checkpoint: ray.train.Checkpoint | None, training, rank: int, run_dir: str) -> Progress:
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
    if rank == 0:
        sync_best(state, storage.join(run_dir, BEST_DIR))
    if state is None:
        return Progress()
    progress = restore_training_state(state, training.core, training.optimizer, training.scheduler)
    if rank == 0:
        print(f"resuming from the checkpoint of epoch {progress.epoch}", flush=True)
    return progress


def _gather_workers(rank: int, world: int, device: torch.device, amp: str) -> list[dict]:
    """Every rank's node, CPU, GPU and training precision (environment.worker), in rank order."""
    node = ray.get_runtime_context().get_node_id()
    facts = [environment.worker(rank, node, device, training_precision(device, amp))] * world
    if world > 1:
        dist.all_gather_object(facts, facts[0])
    return facts


class AttemptClock(Hooks):
    """Rank 0 records the attempt's duration after every epoch, so an attempt whose driver is killed still counts
    (up to its last epoch) in the run's wall time. Wall-clock seconds since the driver started the attempt (the
    driver may be on another node: their clocks' skew is the error)."""

    def __init__(self, run_dir: str, attempt: int, started: float):
        self.run_dir, self.attempt, self.started = run_dir, attempt, started

    def epoch_end(self, metrics: dict) -> None:
        record_duration(self.run_dir, self.attempt, time.time() - self.started)


def _record_workers(run_dir: str, attempt: int, workers: list[dict], resumed_epoch: int) -> None:
    """Rank 0 adds the worker group to environment.json and says in one line when a resumed group trains unlike the
    group that wrote its checkpoint (another worker count, precision or device kind); the run goes on."""
    group = environment.worker_group(workers)
    previous = record_worker_group(run_dir, group, attempt)
    change = environment.group_change(previous, group) if previous and resumed_epoch else None
    if change:
        print(f"note: the checkpoint of epoch {resumed_epoch} was written by a worker group that trained "
              f"otherwise; resuming with {change}", flush=True)


class ReportToRay(Hooks):
    """Rank 0 writes the checkpoint files; every rank reports every epoch to Ray Train (a barrier)."""

    def __init__(self, rank: int, run_dir: str, extra_metrics: dict):
        self.rank, self.best_dir, self.extra = rank, storage.join(run_dir, BEST_DIR), extra_metrics
        self.pending: str | None = None  # this epoch's checkpoint dir, until Ray has taken it

    def checkpoint_due(self, state, *, latest: bool, best: bool) -> None:
        if self.rank != 0:
            return
        contents = state()
        if latest:
            self.pending = tempfile.mkdtemp(prefix="checkpoint-")
            save_checkpoint(contents, self.pending)
        if best:
            save_checkpoint(best_checkpoint(contents), self.best_dir)

    def epoch_end(self, metrics: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(self.pending) if self.pending else None
        try:
            ray.train.report({**metrics, **self.extra}, checkpoint=checkpoint)  # [Ray 5] metrics + checkpoint
        finally:
            if self.pending:
                shutil.rmtree(self.pending, ignore_errors=True)
                self.pending = None


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Runs on every Ray Train worker: `fit` from the latest checkpoint, reporting every epoch to Ray Train.

    Returns {"diverged": {"loss", "epoch"}} if the loss became NaN/inf (every rank sees the same all-reduced loss,
    so all return together), or {"error": message} for an error the user must fix (bad config or data, the same on
    every rank): an exception would make Ray Train retry `max_failures` times for nothing.
    """
    try:
        return _train_worker(loop_config)
    except UserError as e:
        return {"error": str(e)}
    except RuntimeError as e:
        if any(sign in str(e) for sign in PEER_LOST):
            # A peer vanished mid-collective (its node was lost). Let Ray report that death first: it says whether
            # the node was preempted (the preemption budget) or failed (run.max_failures); this error would be
            # charged to run.max_failures. Ray stops this worker as soon as it has seen the death.
            time.sleep(PEER_LOST_WAIT_S)
        raise


def _train_worker(loop_config: dict) -> dict | None:
    cfg = config_lib.from_dict(loop_config["config"])
    context = ray.train.get_context()  # [Ray 1] this worker's rank and device
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads"])
    _quiet_ray_train_logs()
    data = _worker_splits(cfg, ray.get(loop_config["data"]), device)  # [Ray 2] the dataset, zero-copy
    steps = steps_per_epoch(cfg, len(data.train_index), world)
    extra = loop_config["worker_hooks"]() if loop_config["worker_hooks"] else []  # before the model: its set-up applies
    training = build_training(cfg, device, steps, world, wrap=ray.train.torch.prepare_model)  # [Ray 3] DDP
    progress = _restore(ray.train.get_checkpoint(), training, rank, loop_config["run_dir"])  # [Ray 4] resume
    workers = _gather_workers(rank, world, device, cfg.perf.amp)
    log, clock = None, []
    if rank == 0:
        _record_workers(loop_config["run_dir"], loop_config["attempt"], workers, progress.epoch)
        log = RunLog(storage.join(loop_config["run_dir"], TB_DIR), cfg, progress.epoch, steps,
                     loop_config["progress_every_s"])
        clock = [AttemptClock(loop_config["run_dir"], loop_config["attempt"], loop_config["attempt_started"])]
    report = ReportToRay(rank, loop_config["run_dir"], {"worker_nodes": [w["node_id"] for w in workers],
                                                        "params": training.params})
    outcome = fit(cfg, training, data, rank=rank, world=world, progress=progress,
                  hooks=[*([log] if log else []), *clock, report, *extra])
    if log:
        log.close(training.params, None if outcome else loop_config["hparams"])
    return {"diverged": dataclasses.asdict(outcome)} if outcome else None


def selection_summary(cfg: Config, metrics: dict) -> dict:
    """How best/ was chosen, for result.json: on validation accuracy (with its value and the final one), or plainly
    on the test set, so that its best_test_acc is an optimistic estimate."""
    if selection_metric(cfg) == "test_acc":
        return {"best_selected_on": "test set (no data.val_split: best_test_acc is optimistic)"}
    return {"best_selected_on": f"validation set ({cfg.data.val_split} held-out training images)",
            "best_val_acc": metrics.get("best_val_acc"), "final_val_acc": metrics.get("val_acc")}


def _location(directory: str, checkpoint: ray.train.Checkpoint | None) -> str | None:
    """A Ray checkpoint's location in the run's own terms (Ray gives an object store path without its scheme)."""
    return storage.join(directory, storage.name(checkpoint.path)) if checkpoint else None


def connect(address: str | None) -> None:
    """Join `address` (or $RAY_ADDRESS, which `ray job submit` sets), else start a local embedded Ray."""
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", runtime_env=shared_environment())


def shared_environment() -> dict:
    """The runtime env every Ray process of the run gets, on any node: the Ray Train settings above and where the
    object store is (AWS_ENDPOINT_URL, ...). Never credentials: each node has its own (an instance role, or the
    environment its `ray start` ran in). Keys a submitted job's own runtime env sets are left to it (Ray refuses
    two values for one key)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    taken = job.get("env_vars") or {}
    shared = {k: os.environ[k] for k in (*RAY_SETTINGS, *storage.ENDPOINT_ENV) if k in os.environ and k not in taken}
    return {"env_vars": shared} if shared else {}


def plan_resources(cfg: Config) -> tuple[bool, dict[str, float], int]:
    """(use_gpu, resources per worker, torch threads per worker); fails at once if the workers cannot fit.

    Ray Train would otherwise wait forever for a worker group the cluster can never place.
    """
    least, most = cfg.run.worker_range
    if cfg.run.autoscaling:  # the nodes come when the workers ask; Ray Train waits for them
        use_gpu = cfg.run.device != "cpu"
        bundle = {"CPU": cfg.run.cpus_per_worker or 1, **({"GPU": cfg.run.gpus_per_worker} if use_gpu else {})}
        _check_gpu_sharing(cfg, use_gpu)
        return use_gpu, bundle, int(bundle["CPU"])
    total = ray.cluster_resources()
    use_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and total.get("GPU", 0) > 0)
    _check_gpu_sharing(cfg, use_gpu)
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
    return use_gpu, bundle, int(bundle["CPU"])


def _check_gpu_sharing(cfg: Config, use_gpu: bool) -> None:
    """Two ranks of one run on one GPU make NCCL fail ("Duplicate GPU detected"), after the workers started."""
    if use_gpu and cfg.run.gpus_per_worker < 1 and cfg.run.worker_range[1] > 1:
        raise ConfigError(f"run.gpus_per_worker={cfg.run.gpus_per_worker:g} with run.num_workers="
                          f"{cfg.run.workers_text} could put two ranks of this run on one GPU, which NCCL refuses: "
                          "use run.gpus_per_worker=1 for a multi-worker run (fractions pack one-worker sweep "
                          "trials onto a GPU)")


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


def run_training(cfg: Config, address: str | None = None, callbacks: list | None = None,
                 hparams: dict | None = None, worker_hooks: Callable[[], list[Hooks]] | None = None,
                 dataset: ray.ObjectRef | None = None, command: list[str] | None = None) -> dict:
    """Train (or resume) the run `cfg.run.name`; returns the summary also written to result.json.

    `callbacks`: Ray Train user callbacks (a sweep trial forwards reports to Tune); `hparams`: extra entries of the
    TensorBoard HParams record (a sweep trial's swept keys); `worker_hooks`: makes more `fit` hooks on each worker
    (bench/ times steps with them); `dataset`: load_dataset's arrays already in the object store (a sweep puts them
    once for all its trials, and has checked that they fit every trial); default: loaded and put here; `command`:
    the command line environment.json records (default: this process's; a sweep trial passes the sweep's).
    """
    cfg = resolve_run(cfg)
    directory = run_dir(cfg)
    storage.check_writable(cfg.run.storage)  # a bad bucket, endpoint or credentials: one line, before anything runs
    finished = previous_result(cfg)
    if finished:
        return {**finished, "already_finished": True}
    resume_epoch = check_resumable(directory)
    if resume_epoch:
        print(f"resuming run {cfg.run.name} from its epoch-{resume_epoch} checkpoint ({directory})", flush=True)
    if dataset is None:
        arrays = load_dataset(cfg)  # bad data paths fail here, before any Ray process starts
        check_split_fits(cfg, len(arrays["train_labels"]))
    connect(address)
    use_gpu, bundle, threads = plan_resources(cfg)
    write_config(cfg)
    if dataset is None:
        dataset = ray.put(arrays)
        del arrays  # the object store's copy is the node's one copy: the driver's own would sit idle all run
    workers = list(cfg.run.worker_range) if cfg.run.elastic else cfg.run.num_workers
    attempt = record_attempt(directory, environment.attempt(command or sys.argv, workers))
    started = time.time()
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_lib.to_dict(cfg), "run_dir": directory, "data": dataset,
                           "threads": threads, "hparams": hparams or {}, "worker_hooks": worker_hooks,
                           "attempt": attempt, "attempt_started": started,
                           "progress_every_s": progress_every_s(sys.stdout.isatty())},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.worker_range if cfg.run.elastic else cfg.run.num_workers,  # elastic: (min, max)
            elastic_resize_monitor_interval_s=cfg.run.resize_interval_s, use_gpu=use_gpu,
            resources_per_worker=bundle, placement_strategy=cfg.run.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage, callbacks=callbacks,
            # A preempted node (drained by the cluster first, e.g. a reclaimed spot instance) has a budget of its
            # own, unlimited here: only other failures (a crash, a node lost without notice) use max_failures.
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures, max_preemption_failures=-1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )
    result = fit_or_explain(trainer, cfg.run.max_failures)
    metrics, stop = result.metrics or {}, result.return_value or {}
    durations = record_duration(directory, attempt, time.time() - started)
    if "error" in stop:
        raise RunError(f"{stop['error']} (raised on a worker: stopped without retrying, it would fail again)")
    summary = {
        "name": cfg.run.name, "model": cfg.model, "dataset": cfg.data.dataset, "seed": cfg.seed,
        "params": metrics.get("params"), "epoch": metrics.get("epoch", 0), "epochs": cfg.schedule.epochs,
        "final_test_acc": metrics.get("test_acc"), "best_test_acc": metrics.get("best_test_acc"),
        "best_epoch": metrics.get("best_epoch"), **selection_summary(cfg, metrics),
        # Every attempt's duration (a resumed run's earlier ones included), this one's, and how many there were.
        "wall_time_s": round(sum(durations), 1), "last_attempt_s": durations[attempt], "attempts": len(durations),
        "run_dir": directory, "checkpoint": _location(directory, result.checkpoint),
        "best_checkpoint": storage.join(directory, BEST_DIR), "worker_nodes": metrics.get("worker_nodes"),
        "status": "diverged" if "diverged" in stop else "finished", **stop,
    }
    write_result(directory, summary)
    if "diverged" in stop:
        raise diverged_error(summary)
    return summary
