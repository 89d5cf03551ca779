"""The best model of a finished run in its MLflow run: an MLflow PyTorch model (`mlflow.pytorch.load_model` gives
the CifarResNet back) and the plain state dict (`best_state_dict.pt`, for code without MLflow)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from ray_resnet.config import Config
from ray_resnet.constants import NUM_CLASSES
from ray_resnet.core.checkpoint import load_checkpoint
from ray_resnet.core.models import build_model
from ray_resnet.io import storage, tracking

MODEL_ARTIFACT = "best_model"
STATE_DICT_ARTIFACT = "best_state_dict.pt"


def log_best_model(tracked: tracking.TrackedRun, cfg: Config, best_dir: str) -> None:
    """A server that fails here costs only the model's copy in MLflow: a warning (best/ keeps it)."""
    if not storage.exists(best_dir):
        return
    model = build_model(cfg.model, NUM_CLASSES[cfg.data.dataset])
    model.load_state_dict(load_checkpoint(best_dir).model)
    try:
        import mlflow.pytorch

        # Saved locally, then uploaded through the run's own client: mlflow.set_tracking_uri / start_run would set
        # process-wide state (MLFLOW_TRACKING_URI included) that turns tracking on for whatever runs next here.
        with tracking.http_settings(tracking.LOGGING_HTTP), tempfile.TemporaryDirectory() as local:
            # pickle: load_model gives the CifarResNet itself back (pt2 would give a traced graph)
            mlflow.pytorch.save_model(model.eval(), os.path.join(local, MODEL_ARTIFACT), serialization_format="pickle",
                                      input_example=np.zeros((1, 3, 32, 32), np.float32))  # the signature
            torch.save(model.state_dict(), os.path.join(local, STATE_DICT_ARTIFACT))
            client = tracking.client(tracked.tracking_uri)
            client.log_artifacts(tracked.run_id, os.path.join(local, MODEL_ARTIFACT), MODEL_ARTIFACT)
            client.log_artifact(tracked.run_id, os.path.join(local, STATE_DICT_ARTIFACT))
    except Exception as e:  # the training is over and saved; MLflow holds a copy
        print(f"warning: the best model could not be logged to MLflow run {tracked.run_id} ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}); best/ holds it", flush=True)
