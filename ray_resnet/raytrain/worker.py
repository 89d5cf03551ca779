"""The per-worker adapter (Ray): what runs on every Ray Train worker. It builds the core's training from the
driver's `WorkerSpec`, resumes from Ray's checkpoint, runs `core.loop.fit`, reports every epoch to Ray Train and
hands one `Outcome` back. The lines marked `[Ray n]` are what Ray Train adds, numbered as in Ray's own examples.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from ray_resnet.config import Config
from ray_resnet.constants import BEST_DIR, TB_DIR
from ray_resnet.core.checkpoint import Progress, load_checkpoint, save_checkpoint, sync_best
from ray_resnet.core.collectives import gather_objects
from ray_resnet.core.gpushare import cap_gpu_memory
from ray_resnet.core.loop import Diverged, Hooks, Splits, build_training, fit, select_splits, steps_per_epoch
from ray_resnet.core.precision import training_precision
from ray_resnet.core.runlog import CompileNote, RunLog
from ray_resnet.errors import CheckpointError, StorageError, UserError
from ray_resnet.io import environment, storage
from ray_resnet.io.rundir import record_duration, record_worker_group
from ray_resnet.io.tracking import MetricLog, TrackedRun
from ray_resnet.raytrain.compat import quiet_ray_train_logs, wait_for_ray_to_see_a_lost_peer

# How gloo and NCCL collectives fail on the surviving ranks when another rank's process is gone, and how long a
# survivor waits at most (seconds) for Ray to see the lost rank's own death first.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")
PEER_LOST_WAIT_S = 30
# Rank 0 records the attempt's duration in environment.json at least this often (seconds; `ray-resnet status` calls
# a run dir written to in the last 10 minutes running).
RECORD_EVERY_S = 60.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every worker of one attempt."""

    config: Config
    run_dir: str
    dataset: ray.ObjectRef  # the driver's load_dataset arrays in the object store
    threads: int  # torch threads: the CPUs each worker was given
    attempt: int  # its index in environment.json
    attempt_started: float  # time.time() when the driver started the attempt
    progress_every_s: float  # seconds between rank 0's progress lines
    hparams: dict = field(default_factory=dict)  # extra TensorBoard HParams entries (a sweep trial's swept keys)
    worker_hooks: Callable[[], list[Hooks]] | None = None  # makes more `fit` hooks on each worker
    tracked: TrackedRun | None = None  # the MLflow run rank 0 logs to
    resume_from: str | None = None  # the newest intact checkpoint, where the latest one Ray resumes from is damaged


@dataclass(frozen=True)
class Outcome:
    """How the workers ended: every epoch trained, the loss diverged (every rank sees the same all-reduced loss, so
    all stop together), or an error the user must fix (bad config or data, the same on every rank), which an
    exception would make Ray Train retry run.max_failures times for nothing."""

    status: Literal["finished", "diverged", "error"]
    diverged: Diverged | None = None
    error: str | None = None


def train_loop_per_worker(loop_config: dict) -> Outcome:
    """Runs on every Ray Train worker (`loop_config`: {"spec": WorkerSpec}, Ray's envelope)."""
    spec: WorkerSpec = loop_config["spec"]
    peers: dict[str, str] = {}  # the other ranks' actor ids and node ids, once gathered
    try:
        return _train_worker(spec, peers)
    except StorageError as e:  # the store failed mid-run (a 503, a stall), on rank 0 alone: not the user's to fix
        raise RuntimeError(f"storage failed during the run (restarted from the last checkpoint up to run.max_failures "
                           f"times): {e}") from None
    except UserError as e:
        return Outcome("error", error=str(e))
    except RuntimeError as e:
        if any(sign in str(e) for sign in PEER_LOST):  # a peer vanished mid-collective: its node may be lost
            wait_for_ray_to_see_a_lost_peer(peers, PEER_LOST_WAIT_S)
        raise


def _train_worker(spec: WorkerSpec, peers: dict[str, str]) -> Outcome:
    cfg = spec.config
    context = ray.train.get_context()  # [Ray 1] this worker's rank and device
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cap_gpu_memory(cfg.run.gpus_per_worker, device)  # before the dataset and the model take GPU memory
    torch.set_num_threads(spec.threads)
    quiet_ray_train_logs()
    data = _worker_splits(cfg, ray.get(spec.dataset), device)  # [Ray 2] the dataset, zero-copy
    steps = steps_per_epoch(cfg, len(data.train_index), world)
    extra = spec.worker_hooks() if spec.worker_hooks else []  # before the model: a hook's set-up applies to it
    training = build_training(cfg, device, steps, world, wrap=lambda model, **ddp: ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs=ddp))  # [Ray 3] DDP
    progress = _restore(ray.train.get_checkpoint(), training, rank, spec)  # [Ray 4] resume
    workers = _gather_workers(rank, device, cfg.perf.amp, peers)
    rank0 = _rank0_hooks(spec, workers, progress.epoch, steps, training.compiled) if rank == 0 else []
    report = ReportToRay(rank, spec.run_dir, {"worker_nodes": [w["node_id"] for w in workers],
                                              "params": training.params})
    diverged = fit(cfg, training, data, rank=rank, world=world, progress=progress, hooks=[*rank0, report, *extra])
    for hook in rank0:
        if isinstance(hook, RunLog):
            hook.close(training.params, None if diverged else spec.hparams)
    return Outcome("diverged", diverged=diverged) if diverged else Outcome("finished")


def _worker_splits(cfg: Config, arrays: dict[str, np.ndarray], device: torch.device) -> Splits:
    with warnings.catch_warnings():  # arrays from the object store are read-only; we only ever index them
        warnings.simplefilter("ignore", UserWarning)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if device.type == "cuda":  # the whole uint8 set fits on the GPU (150 MB): no per-step host transfers
        tensors = {k: v.to(device) for k, v in tensors.items()}
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: pick the fastest conv kernels once
    return select_splits(cfg, tensors)


def _restore(checkpoint: ray.train.Checkpoint | None, training, rank: int, spec: WorkerSpec) -> Progress:
    state = None
    if checkpoint is not None:
        try:
            with checkpoint.as_directory() as d:
                state = load_checkpoint(d)
        except CheckpointError:
            if spec.resume_from is None:  # the driver found it intact: not damaged when the attempt began
                raise
            state = load_checkpoint(spec.resume_from)  # the newest intact one: the driver passed over the latest
    if rank == 0:
        sync_best(state, storage.join(spec.run_dir, BEST_DIR))
    if state is None:
        return Progress()
    progress = state.restore(training)
    if rank == 0:
        print(f"resuming from the checkpoint of epoch {progress.epoch}", flush=True)
    return progress


def _gather_workers(rank: int, device: torch.device, amp: str, peers: dict[str, str]) -> list[dict]:
    """Every rank's node, CPU, GPU and training precision (environment.worker), in rank order; `peers` gets the
    other ranks' Ray actor ids and node ids, to ask Ray about a peer that vanishes."""
    context = ray.get_runtime_context()
    record = environment.worker(rank, context.get_node_id(), device, training_precision(device, amp))
    gathered = gather_objects((record, context.get_actor_id()))
    peers.update({actor: worker["node_id"] for other, (worker, actor) in enumerate(gathered) if other != rank})
    return [worker for worker, _ in gathered]


def _rank0_hooks(spec: WorkerSpec, workers: list[dict], resumed_epoch: int, steps: int,
                 compiled: bool) -> list[Hooks]:
    """Rank 0 records the worker group, and logs to TensorBoard (and MLflow) and the attempt's duration every
    epoch, and the first step's compile time where the model is compiled."""
    _record_workers(spec.run_dir, spec.attempt, workers, resumed_epoch)
    mlflow = MetricLog(spec.tracked, {"precision": workers[0]["precision"], "workers": str(len(workers)),
                                      "device": workers[0]["device"].split(":")[0]}) if spec.tracked else None
    log = RunLog(storage.join(spec.run_dir, TB_DIR), spec.config, resumed_epoch, steps, spec.progress_every_s,
                 mlflow)
    return [log, AttemptClock(spec.run_dir, spec.attempt, spec.attempt_started), *([CompileNote()] if compiled else [])]


def _record_workers(run_dir: str, attempt: int, workers: list[dict], resumed_epoch: int) -> None:
    """Add the worker group to environment.json; say in one line when a resumed group trains unlike the group that
    wrote its checkpoint (another worker count, precision or device kind). The run goes on."""
    group = environment.worker_group(workers)
    previous = record_worker_group(run_dir, group, attempt)
    change = environment.group_change(previous, group) if previous and resumed_epoch else None
    if change:
        print(f"note: the checkpoint of epoch {resumed_epoch} was written by a worker group that trained "
              f"otherwise; resuming with {change}", flush=True)


class AttemptClock(Hooks):
    """Rank 0 records the attempt's duration after every checkpointed epoch and at least every RECORD_EVERY_S (at
    an epoch's end), so an attempt whose driver is killed still counts (up to then) in the run's wall time.
    Wall-clock seconds since the driver started the attempt (the driver may be on another node: their clocks' skew
    is the error). Not after every epoch: environment.json is read and written whole, two requests to a bucket."""

    def __init__(self, run_dir: str, attempt: int, started: float):
        self.run_dir, self.attempt, self.started = run_dir, attempt, started
        self.recorded = time.time()
        self.checkpointed = False

    def checkpoint_due(self, state, *, best: bool) -> None:
        self.checkpointed = True

    def epoch_end(self, metrics: dict) -> None:
        now = time.time()
        if self.checkpointed or now - self.recorded >= RECORD_EVERY_S:
            record_duration(self.run_dir, self.attempt, now - self.started)
            self.recorded, self.checkpointed = now, False


class ReportToRay(Hooks):
    """Rank 0 writes the checkpoint files; every rank reports every epoch to Ray Train (a barrier).

    To an object store (a URI run dir) Ray uploads a checkpoint in a background thread (ASYNC) and deletes the local
    copy once it is up: the next epoch trains meanwhile, instead of every rank waiting out the PUTs. A local run dir
    is copied in the report itself (SYNC): a disk copy of a few MB takes milliseconds, and the temp dir is gone when
    report returns, whatever happened."""

    def __init__(self, rank: int, run_dir: str, extra_metrics: dict):
        self.rank, self.best_dir, self.extra = rank, storage.join(run_dir, BEST_DIR), extra_metrics
        self.asynchronous = storage.is_uri(run_dir)
        self.pending: str | None = None  # this epoch's checkpoint dir, until Ray has taken it

    def checkpoint_due(self, state, *, best: bool) -> None:
        if self.rank != 0:
            return
        contents = state()
        self.pending = tempfile.mkdtemp(prefix="checkpoint-")
        save_checkpoint(contents, self.pending)
        if best:
            save_checkpoint(contents.best_only(), self.best_dir)

    def epoch_end(self, metrics: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(self.pending) if self.pending else None
        mode = ray.train.CheckpointUploadMode.ASYNC if self.asynchronous else ray.train.CheckpointUploadMode.SYNC
        try:
            ray.train.report({**metrics, **self.extra}, checkpoint=checkpoint,  # [Ray 5] metrics + checkpoint
                             checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=self.asynchronous)
        finally:
            if self.pending and not self.asynchronous:  # ASYNC: Ray deletes it after the upload, which still reads it
                shutil.rmtree(self.pending, ignore_errors=True)
            self.pending = None
