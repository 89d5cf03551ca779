"""How a run ends when something goes wrong (the Ray edge): one clear line saying what happened and what to do.

Ray Train restarts a failed worker group from the latest checkpoint up to `run.max_failures` times; when it
gives up, or a worker group does not start (within run.start_timeout_s), the driver raises `RunError` instead of a
multi-page traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray
import ray.train

from ray_resnet.config import RunConfig
from ray_resnet.errors import RunError, WorkersNotStartedError
from ray_resnet.raytrain.compat import worker_group_start_failure, worker_logs_dir


def _first_cause(error: Exception) -> str:
    """The worker's or controller's own exception, in one line (Ray wraps it in pages of context)."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(error, "controller_failure", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[-1] if lines else type(cause).__name__
    return f"{type(cause).__name__}: {text}"[:300]


def fit_or_explain(trainer: ray.train.torch.TorchTrainer, run: RunConfig,
                   bundle: dict[str, float]) -> ray.train.Result:
    """`trainer.fit()`, with Ray's give-up turned into one `RunError` line (`bundle`: each worker's resources)."""
    try:
        with _sigint_handler_restored_after():
            return trainer.fit()
    except ray.train.ControllerError as e:
        failure = worker_group_start_failure(e.controller_failure)
        if failure == "timeout":
            raise WorkersNotStartedError(
                f"no worker group of {run.workers_text} worker(s) x {bundle} started within run.start_timeout_s="
                f"{run.start_timeout_s:g} s: the cluster never had room for them (add nodes, check the autoscaler's "
                "logs and quotas, or lower --num-workers / run.cpus_per_worker / run.gpus_per_worker); rerun the "
                "same command to resume, or raise --set run.start_timeout_s=N to wait longer") from None
        if failure == "failed":
            raise RunError(
                f"the worker group of {run.workers_text} worker(s) x {bundle} failed to start ({_first_cause(e)}); "
                f"worker logs: {worker_logs_dir()}; rerun the same command to resume") from None
        # Ray retries no other controller error (e.g. its run-state write to the storage failing past the store's
        # retries): max_failures played no part.
        raise RunError(f"Ray Train's controller stopped the run ({_first_cause(e)}); rerun the same command to "
                       "resume from the latest checkpoint") from None
    except ray.train.TrainingFailedError as e:
        raise _gave_up(e, run.max_failures) from None


@contextmanager
def _sigint_handler_restored_after() -> Iterator[None]:
    """fit() in the main thread installs a Ctrl-C handler that aborts its run, and leaves it there: afterwards Ctrl-C
    would only abort a finished run (the driver going on, and exiting 0 at the third), and the handler's reference
    would keep the run's controller actor and its process alive until the driver exits. The handler fit found is put
    back when it returns."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signal handlers
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def _gave_up(error: Exception, max_failures: int) -> RunError:
    return RunError(
        f"training failed and Ray Train gave up after run.max_failures={max_failures} restart(s) "
        f"({_first_cause(error)}); worker logs: {worker_logs_dir()}; rerun the same command to resume from the "
        f"latest checkpoint, or raise --set run.max_failures=N")
