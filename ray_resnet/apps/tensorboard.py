"""`ray-resnet tensorboard DIR`: serve TensorBoard on a run dir or a sweep dir (a thin wrapper over
`tensorboard --logdir`, which finds every run's `tb/` event files below DIR).

DIR may be an s3:// URI: TensorBoard reads S3 itself through boto3, with the same credentials and, for an
S3-compatible store, the endpoint in AWS_ENDPOINT_URL (or TensorBoard's own S3_ENDPOINT)."""

from __future__ import annotations

import os
import sys

from ray_resnet.errors import NoRunsError
from ray_resnet.io import storage


def tensorboard_argv(logdir: str, host: str, port: int) -> list[str]:
    # `python -m tensorboard.main` with this interpreter: the `tensorboard` script may not be on PATH.
    return [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", host, "--port", str(port)]


def serve(logdir: str, host: str = "127.0.0.1", port: int = 6006) -> None:
    """Replace this process by TensorBoard (so Ctrl-C and kill reach it directly); returns only on bad input."""
    logdir = storage.absolute(logdir)
    if storage.is_uri(logdir) and not logdir.startswith("s3://"):
        raise NoRunsError(f"{logdir}: TensorBoard reads local dirs and s3:// only (other object stores need "
                          "tensorflow); copy the dir locally first, e.g. gsutil -m rsync -r URI DIR")
    if not storage.exists(logdir):
        raise NoRunsError(f"{logdir} does not exist; pass a run dir (runs/<name>) or a sweep dir")
    if not any(storage.name(f).startswith("events.out.tfevents.") for f in storage.walk_files(logdir)):
        raise NoRunsError(f"no TensorBoard event files under {logdir}: runs write them to <run dir>/tb once "
                          "their first epoch ends; pass a run dir or a sweep dir")
    print(f"TensorBoard on {logdir} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    argv = tensorboard_argv(logdir, host, port)
    os.execv(argv[0], argv)
