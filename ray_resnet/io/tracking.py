"""MLflow tracking, optional (`pip install "ray-resnet[mlflow]"`; pure: no Ray).

On when run.mlflow (or $MLFLOW_TRACKING_URI) names a tracking server. The driver opens the run before Ray starts (a
server that is down or refuses is one line then, before any work): the resolved config as params, tags, and its
id in <run dir>/mlflow.json, so a resumed run continues the same MLflow run. Rank 0 logs the metrics TensorBoard
gets, under the same names, and holds them until the epoch's checkpoint is written: an attempt that dies after it
resumes from that checkpoint and logs the epochs after it once more, so every epoch appears once. A server that
fails mid-run never ends the training: a warning, and the metrics wait for the next epoch's try. The run dir stays
the source of truth. A sweep is one parent run; each trial is its child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ray_resnet import config as config_lib
from ray_resnet.config import Config
from ray_resnet.constants import TRACKING_FILE
from ray_resnet.errors import TrackingError
from ray_resnet.io import storage

# MLflow's client retries a failed request 7 times with backoff (minutes); the up-front check wants an answer
# within seconds, and rank 0 must not stall training for long while a server is away.
PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
LOGGING_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PARAMS_PER_REQUEST = 100  # MLflow's log_batch limit


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run this run dir (or sweep dir) logs to: <dir>/mlflow.json."""

    tracking_uri: str
    experiment_id: str
    run_id: str


def config_params(cfg: Config) -> dict:
    """The resolved config as MLflow params: dotted keys (optim.lr, ...)."""
    return config_lib.flatten(config_lib.to_dict(cfg))


def tracking_uri(cfg: Config) -> str | None:
    return cfg.run.mlflow or os.environ.get("MLFLOW_TRACKING_URI") or None


@contextlib.contextmanager
def http_settings(settings: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("run.mlflow needs MLflow: pip install \"ray-resnet[mlflow]\" (or unset run.mlflow and "
                            "MLFLOW_TRACKING_URI)") from None
    return MlflowClient(tracking_uri=uri)


def parent_run(cfg: Config) -> TrackedRun | None:
    """The MLflow run of the sweep dir a run lies in (run.storage is its sweep's dir), if the sweep has one."""
    saved = storage.read_json(storage.join(cfg.run.storage, TRACKING_FILE)) if tracking_uri(cfg) else None
    return TrackedRun(**saved) if saved else None


def open_run(cfg: Config, directory: str, name: str, params: dict, parent: TrackedRun | None = None,
             tags: dict[str, str] | None = None) -> TrackedRun | None:
    """The MLflow run of `directory` (a run or sweep dir): the one its mlflow.json names (running again), else a
    new one with `params`. None when tracking is off. Raises TrackingError in one line if the server cannot be
    used."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    saved = storage.read_json(storage.join(directory, TRACKING_FILE))
    with http_settings(PROBE_HTTP):
        mlflow = client(uri)
        try:
            if saved and saved.get("tracking_uri") == uri:
                mlflow.update_run(saved["run_id"], status="RUNNING")  # a resumed run continues its MLflow run
                return TrackedRun(**saved)
            return _new_run(mlflow, cfg, directory, name, params, parent, tags or {})
        except TrackingError:
            raise
        except Exception as e:  # connection refused, HTTP 4xx/5xx, a bad URI: all mean "not usable now"
            raise TrackingError(f"MLflow tracking server {uri} cannot be used ({_first_line(e)}); start it, fix "
                                "run.mlflow / MLFLOW_TRACKING_URI, or unset them to train without MLflow") from None


def _new_run(mlflow, cfg: Config, directory: str, name: str, params: dict, parent: TrackedRun | None,
             tags: dict[str, str]) -> TrackedRun:
    from mlflow.entities import Param

    experiment = mlflow.get_experiment_by_name(cfg.run.mlflow_experiment)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(cfg.run.mlflow_experiment)
    if parent:
        tags = {**tags, "mlflow.parentRunId": parent.run_id}
    run_id = mlflow.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    entries = [Param(k, str(v)[:6000]) for k, v in params.items()]  # MLflow keeps values up to 6000 characters
    for start in range(0, len(entries), PARAMS_PER_REQUEST):
        mlflow.log_batch(run_id, params=entries[start:start + PARAMS_PER_REQUEST])
    tracked = TrackedRun(tracking_uri(cfg), experiment_id, run_id)
    storage.write_text(storage.join(directory, TRACKING_FILE), json.dumps(dataclasses.asdict(tracked)) + "\n")
    return tracked


def end_run(tracked: TrackedRun, status: str, artifacts: dict[str, str]) -> None:
    """Attach `artifacts` (artifact name -> file, local or URI) and mark the run FINISHED / FAILED / KILLED. A server
    that fails here only costs the artifacts: a warning, and the run dir keeps everything."""
    import tempfile

    try:
        with http_settings(LOGGING_HTTP), tempfile.TemporaryDirectory() as local:
            mlflow = client(tracked.tracking_uri)
            for artifact, source in artifacts.items():
                if storage.is_file(source):
                    path = os.path.join(local, artifact)
                    with open(path, "wb") as f:
                        f.write(storage.read_bytes(source))
                    mlflow.log_artifact(tracked.run_id, path)
            mlflow.set_terminated(tracked.run_id, status)
    except Exception as e:  # the training is over and saved; MLflow is a copy
        print(f"warning: MLflow run {tracked.run_id} could not be completed ({_first_line(e)}); the run dir holds "
              "every result", flush=True)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class MetricLog:
    """Rank 0's metrics for one MLflow run. Points wait in `pending` until `commit` (after the epoch whose
    checkpoint a resumed attempt would start from); a failed send keeps them for the next commit. A point at a step
    the run already has is dropped: a driver killed between a checkpoint's upload and Ray's record of it leaves an
    epoch logged that the next attempt trains again (MLflow cannot delete points; TensorBoard shows the new one)."""

    def __init__(self, tracked: TrackedRun, tags: dict[str, str]):
        os.environ.update(LOGGING_HTTP)  # this is rank 0's own process: every MLflow call here stays short
        self.tracked, self.client = tracked, client(tracked.tracking_uri)
        self.pending: list = []
        self.logged_through: dict[str, int] = {}  # metric -> the last step the run had when this attempt began
        self.failing = False
        self._send(lambda: self.client.log_batch(tracked.run_id, tags=_tags(tags)))

    def add(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now_ms, step) for key, value in values.items()
                         if step > self._logged_through(key)]

    def _logged_through(self, key: str) -> int:
        if key not in self.logged_through:
            history = []
            self._send(lambda: history.extend(self.client.get_metric_history(self.tracked.run_id, key)))
            self.logged_through[key] = max((m.step for m in history), default=0)
        return self.logged_through[key]

    def commit(self) -> None:
        if self.pending and self._send(lambda: self._log(self.pending)):
            self.pending = []

    def _log(self, points: list) -> None:
        for start in range(0, len(points), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.tracked.run_id, metrics=points[start:start + 1000])

    def _send(self, call) -> bool:
        try:
            call()
        except Exception as e:  # a server away mid-run must not end the training
            if not self.failing:
                print(f"warning: MLflow logging failed ({_first_line(e)}); training goes on, and the metrics are "
                      "sent again after the next epoch", flush=True)
            self.failing = True
            return False
        if self.failing:
            print("MLflow logging works again; the held metrics were sent", flush=True)
        self.failing = False
        return True


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]
