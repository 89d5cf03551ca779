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

        with tracking.http_settings(tracking.LOGGING_HTTP), tempfile.TemporaryDirectory() as local:
            mlflow.set_tracking_uri(tracked.tracking_uri)
            with mlflow.start_run(run_id=tracked.run_id):
                # pickle: load_model gives the CifarResNet itself back (pt2 would give a traced graph)
                mlflow.pytorch.log_model(model.eval(), name=MODEL_ARTIFACT, serialization_format="pickle",
                                         input_example=np.zeros((1, 3, 32, 32), np.float32))  # the signature
                path = os.path.join(local, STATE_DICT_ARTIFACT)
                torch.save(model.state_dict(), path)
                mlflow.log_artifact(path)
    except Exception as e:  # the training is over and saved; MLflow holds a copy
        print(f"warning: the best model could not be logged to MLflow run {tracked.run_id} ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}); best/ holds it", flush=True)
