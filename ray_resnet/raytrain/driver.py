"""The driver (Ray): `run_training` trains (or resumes) one run with Ray Train's `TorchTrainer`. It checks what it
can before Ray starts, puts the dataset into the object store once, hands every worker one `WorkerSpec`, and turns
their `Outcome` into the run's result.json (`io.rundir.RunResult`). The run dir's layout is in io/rundir.py.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import numpy as np
import ray
import ray.train
import ray.train.torch

from ray_resnet.config import Config, split_problems
from ray_resnet.constants import BEST_DIR, CONFIG_FILE, RESULT_FILE
from ray_resnet.core.checkpoint import load_checkpoint
from ray_resnet.core.datasets import load_cifar
from ray_resnet.core.loop import Hooks, selection_metric
from ray_resnet.core.runlog import progress_every_s
from ray_resnet.errors import CheckpointError, CheckpointFormatError, ConfigError, RunError
from ray_resnet.io import environment, lease, storage, tracking
from ray_resnet.io.rundir import (
    RunResult,
    diverged_error,
    kept_checkpoints,
    latest_checkpoint,
    previous_result,
    read_result,
    record_attempt,
    record_duration,
    resolve_run,
    run_dir,
    write_config,
    write_result,
)
from ray_resnet.raytrain.cluster import WorkerResources, connect, plan_resources, ray_settings, start_timeout
from ray_resnet.raytrain.failures import fit_or_explain
from ray_resnet.raytrain.worker import Outcome, WorkerSpec, train_loop_per_worker


def load_dataset(cfg: Config) -> dict[str, np.ndarray]:
    """The decoded uint8 train and test arrays, whole (workers pick their subsets), as numpy so that ray.put
    shares them zero-copy between the workers of a node."""
    out = {}
    for split in ("train", "test"):
        images, labels = load_cifar(cfg.data.root, split, cfg.data.dataset, cfg.data.download, cfg.data.cache_dir)
        out[f"{split}_images"], out[f"{split}_labels"] = images.numpy(), labels.numpy()
    return out


def check_split_fits(cfg: Config, num_train: int) -> None:
    """The config's split check again, with the training images the data dir really holds."""
    problems = split_problems(cfg, num_train, f"under {cfg.data.root}")
    if problems:
        raise ConfigError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a rerun resumes: the epoch of the newest intact kept checkpoint (0: none), and that checkpoint's
    location when Ray's latest is damaged (the workers load it instead)."""

    epoch: int = 0
    instead_of_latest: str | None = None


def check_resumable(directory: str) -> ResumePoint:
    """The newest intact checkpoint a rerun resumes from. A damaged one (truncated, of an unknown format) is passed
    over, in one line naming it and why; all of them damaged stops here, not in N retries on the workers."""
    kept = kept_checkpoints(directory) if latest_checkpoint(directory) else []
    problems = []
    for path in kept:
        try:
            epoch = load_checkpoint(path).epoch
        except CheckpointFormatError as e:  # written by another version: so are the older ones
            raise RunError(f"cannot resume {storage.name(directory)}: {e}") from None
        except CheckpointError as e:
            problems.append(str(e))
            print(f"note: passing over the damaged checkpoint {storage.name(path)}: {e}", flush=True)
            continue
        return ResumePoint(epoch, path if path != kept[0] else None)
    if problems:
        raise RunError(f"cannot resume {storage.name(directory)}: no kept checkpoint is intact ({problems[0]}); "
                       "pass --name for a fresh run (nothing was deleted)")
    return ResumePoint()


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


def run_training(cfg: Config, address: str | None = None, callbacks: list | None = None,
                 hparams: dict | None = None, worker_hooks: Callable[[], list[Hooks]] | None = None,
                 dataset: ray.ObjectRef | None = None, command: list[str] | None = None) -> RunResult:
    """Train (or resume) the run `cfg.run.name`; returns what it also writes to result.json.

    `callbacks`: Ray Train user callbacks (a sweep trial forwards reports to Tune); `hparams`: extra entries of the
    TensorBoard HParams record (a sweep trial's swept keys); `worker_hooks`: makes more `fit` hooks on each worker
    (bench/ times steps with them); `dataset`: load_dataset's arrays already in the object store (a sweep puts them
    once for all its trials, and has checked that they fit every trial); default: loaded and put here; `command`:
    the command line environment.json records (default: this process's; a sweep trial passes the sweep's).
    """
    cfg = resolve_run(cfg)
    storage.check_writable(cfg.run.storage)  # a bad bucket, endpoint or credentials: one line, before anything runs
    # One driver per run dir: taken before anything there is read, held (with a heartbeat) until the run ends.
    with lease.held(run_dir(cfg), "run dir", "wait for it to end, or pick another --name"):
        return _train_held(cfg, address, callbacks, hparams, worker_hooks, dataset, command)


def _train_held(cfg: Config, address: str | None, callbacks: list | None, hparams: dict | None,
                worker_hooks: Callable[[], list[Hooks]] | None, dataset: ray.ObjectRef | None,
                command: list[str] | None) -> RunResult:
    """run_training's work, under the run dir's lease."""
    directory = run_dir(cfg)
    finished = previous_result(cfg)
    if finished:
        return dataclasses.replace(finished, already_finished=True)
    resume = check_resumable(directory)
    if resume.epoch:
        print(f"resuming run {cfg.run.name} from its epoch-{resume.epoch} checkpoint ({directory})", flush=True)
    tracked = tracking.open_run(cfg, directory, cfg.run.name, tracking.config_params(cfg), tracking.parent_run(cfg),
                                _tracking_tags(cfg))
    arrays = None if dataset is not None else load_dataset(cfg)  # bad data paths fail here, before Ray starts
    if arrays is not None:
        check_split_fits(cfg, len(arrays["train_labels"]))
    with ray_settings():
        connect(address)
        resources = plan_resources(cfg)
        write_config(cfg)
        if arrays is not None:  # the object store's copy is the node's one copy: the driver's would sit idle all run
            dataset, arrays = ray.put(arrays), None
        workers = list(cfg.run.worker_range) if cfg.run.elastic else cfg.run.num_workers
        spec = WorkerSpec(cfg, directory, dataset, resources.threads,
                          record_attempt(directory, environment.attempt(command or sys.argv, workers)), time.time(),
                          progress_every_s(sys.stdout.isatty()), hparams or {}, worker_hooks, tracked,
                          resume.instead_of_latest)
        try:
            with start_timeout(cfg):
                result = fit_or_explain(_trainer(spec, resources, callbacks), cfg.run, resources.bundle)
            return _finish(spec, result)
        finally:
            if tracked:
                _end_tracking(tracked, cfg, directory)


def _tracking_tags(cfg: Config) -> dict[str, str]:
    commit = (environment.git_state() or {}).get("commit")
    return {"model": cfg.model, "recipe": cfg.recipe, "dataset": cfg.data.dataset, "seed": str(cfg.seed),
            **({"git_commit": commit} if commit else {})}


def _end_tracking(tracked: tracking.TrackedRun, cfg: Config, directory: str) -> None:
    """The MLflow run's status from result.json (none: the attempt failed, and a rerun continues the run), its
    files, and the best model as an MLflow PyTorch model."""
    from ray_resnet.core.tracked_model import log_best_model

    result = read_result(directory)
    status = {"finished": "FINISHED", "diverged": "FAILED"}.get(result.status) if result else None
    if status:
        log_best_model(tracked, cfg, storage.join(directory, BEST_DIR))
    tracking.end_run(tracked, status or "KILLED", {
        "result.json": storage.join(directory, RESULT_FILE), "config.yaml": storage.join(directory, CONFIG_FILE)})


def _trainer(spec: WorkerSpec, resources: WorkerResources, callbacks: list | None) -> ray.train.torch.TorchTrainer:
    run = spec.config.run
    storage_path, storage_filesystem = storage.for_ray(run.storage)  # an S3 bucket: with our retries
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker, train_loop_config={"spec": spec},
        torch_config=ray.train.torch.TorchConfig(timeout_s=int(run.collective_timeout_s)),  # a hung peer's bound
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.worker_range if run.elastic else run.num_workers,  # elastic: (min, max)
            elastic_resize_monitor_interval_s=run.resize_interval_s, use_gpu=resources.use_gpu,
            resources_per_worker=resources.bundle, placement_strategy=run.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run.name, storage_path=storage_path, storage_filesystem=storage_filesystem, callbacks=callbacks,
            # A preempted node (drained by the cluster first, e.g. a reclaimed spot instance) has a budget of its
            # own, unlimited here: only other failures (a crash, a node lost without notice) use max_failures.
            # controller_failure_limit counts the worker group's starts that failed or timed out (the only
            # controller errors Ray retries), over the whole fit. A fixed-size run allows none: each start or
            # restart waits up to run.start_timeout_s (cluster.start_timeout) for room, then the run stops in one
            # line (Ray's -1 would retry a start that can never be placed forever). An elastic run keeps -1: Ray's
            # elastic policy starts a group only at a size its view of the live nodes says fits (below its minimum
            # it waits without starting one, which no limit bounds), so a start that times out was sized on a view
            # gone stale (a node just lost, tests/test_faults.py's elastic test) and its retry asks for what fits;
            # with 0 that first stale try would end the run.
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures, max_preemption_failures=-1,
                                                   controller_failure_limit=-1 if run.elastic else 0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
        ),
    )


def _finish(spec: WorkerSpec, result: ray.train.Result) -> RunResult:
    """result.json from the workers' Outcome and last report; raises for an error or a diverged loss."""
    cfg, directory, metrics = spec.config, spec.run_dir, result.metrics or {}
    outcome: Outcome = result.return_value or Outcome("finished")
    durations = record_duration(directory, spec.attempt, time.time() - spec.attempt_started)
    if outcome.status == "error":
        raise RunError(f"{outcome.error} (raised on a worker: stopped without retrying, it would fail again)")
    diverged = outcome.diverged
    summary = RunResult(
        name=cfg.run.name, model=cfg.model, dataset=cfg.data.dataset, seed=cfg.seed, epoch=metrics.get("epoch", 0),
        epochs=cfg.schedule.epochs, status=outcome.status, params=metrics.get("params"),
        final_test_acc=metrics.get("test_acc"), best_test_acc=metrics.get("best_test_acc"),
        best_epoch=metrics.get("best_epoch"), **selection_summary(cfg, metrics),
        wall_time_s=round(sum(durations), 1), last_attempt_s=durations[spec.attempt], attempts=len(durations),
        run_dir=directory, checkpoint=_location(directory, result.checkpoint),
        best_checkpoint=storage.join(directory, BEST_DIR), worker_nodes=metrics.get("worker_nodes"),
        diverged_loss=diverged.loss if diverged else None, diverged_epoch=diverged.epoch if diverged else None)
    write_result(directory, summary)
    if diverged:
        raise diverged_error(summary)
    return summary
