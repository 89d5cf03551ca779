"""How a run ends when something goes wrong (the Ray edge): one clear line saying what happened and what to do.

Ray Train restarts a failed worker group from the latest checkpoint up to `run.max_failures` times; when it
gives up, the driver raises `RunError` instead of a multi-page traceback.
"""

from __future__ import annotations

import ray
import ray.train

from ray_resnet.errors import RunError
from ray_resnet.raytrain.compat import worker_logs_dir


def _first_cause(error: Exception) -> str:
    """The worker's or controller's own exception, in one line (Ray wraps it in pages of context)."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(error, "controller_failure", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[-1] if lines else type(cause).__name__
    return f"{type(cause).__name__}: {text}"[:300]


def fit_or_explain(trainer: ray.train.torch.TorchTrainer, max_failures: int) -> ray.train.Result:
    """`trainer.fit()`, with Ray's give-up turned into one `RunError` line."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RunError(
            f"training failed and Ray Train gave up after run.max_failures={max_failures} restart(s) "
            f"({_first_cause(e)}); worker logs: {worker_logs_dir()}; rerun the same command to resume from the "
            f"latest checkpoint, or raise --set run.max_failures=N"
        ) from None
