"""Errors a user can fix (no Ray, no torch): `ray-resnet` prints their message as one line and exits with 2.

Each message names what is wrong (the key, file, path or URI) and what to do about it. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a state the user can change; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key and the valid choices."""


class DataError(UserError, ValueError):
    """Dataset files are unreadable or do not hold CIFAR (schema, image size, labels); the message names the file."""


class DataNotFoundError(DataError, FileNotFoundError):
    """No CIFAR source under the given root (and download was not requested)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, truncated or not ours; the message says which file and what to do."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint of a format this version cannot read: every checkpoint of its run is, so none is passed over."""


class WeightsError(UserError, ValueError):
    """A weights file is unreadable, not a state dict, or does not fit the model; the message says which keys."""


class ExportError(UserError, RuntimeError):
    """An export cannot be made as asked (unknown format, missing package); the message says what to install."""


class StorageError(UserError, OSError):
    """A storage location (local path or URI) cannot be used: no such bucket, refused credentials, no answer from
    the endpoint, a scheme pyarrow cannot open; the message names the location and what to check."""


class RunError(UserError, RuntimeError):
    """A run cannot start or go on as asked; the message says why and what to do."""


class WorkersNotStartedError(RunError):
    """No worker group could be placed within run.start_timeout_s. The cluster may have room later (nodes that come,
    runs that end), so a sweep trial that ends so is not recorded as failed: `sweep --resume` reruns it."""


class DirInUseError(UserError, RuntimeError):
    """Another live driver holds the lease on a run dir or sweep dir; the message names it (host, pid, since when,
    its last heartbeat) and what to do."""


class DivergedError(RunError):
    """The training loss became NaN/inf: no restart can fix that, so the run stops (and stays stopped)."""


class SweepError(UserError, ValueError):
    """A sweep file or sweep dir is wrong; the message names the key or path and what to do."""


class ReportError(UserError, ValueError):
    """The directory is not a sweep dir (or holds no runs); the message says what was expected."""


class NoRunsError(UserError, FileNotFoundError):
    """The directory holds no TensorBoard event files."""


class TrackingError(UserError, RuntimeError):
    """MLflow tracking asked for (run.mlflow, MLFLOW_TRACKING_URI) but not usable: not installed, server down."""


class TensorBoardError(UserError, RuntimeError):
    """TensorBoard exited on its own with an error (e.g. its port is taken); it printed why just before."""


class NoRunDirsError(UserError, FileNotFoundError):
    """A storage root holds no run dirs (dirs with a config.yaml), or does not exist."""
