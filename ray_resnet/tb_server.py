"""`ray-resnet tensorboard DIR`: serve TensorBoard on a run dir or a sweep dir (a thin wrapper over
`tensorboard --logdir`, which finds every run's `tb/` event files below DIR)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import NoRunsError


def tensorboard_argv(logdir: str | Path, host: str, port: int) -> list[str]:
    # `python -m tensorboard.main` with this interpreter: the `tensorboard` script may not be on PATH.
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port)]


def serve(logdir: str | Path, host: str = "127.0.0.1", port: int = 6006) -> None:
    """Replace this process by TensorBoard (so Ctrl-C and kill reach it directly); returns only on bad input."""
    logdir = Path(logdir).expanduser()
    if not logdir.is_dir():
        raise NoRunsError(f"{logdir} is not a directory; pass a run dir (runs/<name>) or a sweep dir")
    if next(logdir.rglob("events.out.tfevents.*"), None) is None:
        raise NoRunsError(f"no TensorBoard event files under {logdir}: runs write them to <run dir>/tb once "
                          "their first epoch ends; pass a run dir or a sweep dir")
    print(f"TensorBoard on {logdir} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    argv = tensorboard_argv(logdir, host, port)
    os.execv(argv[0], argv)
