"""`ray-resnet tensorboard DIR`: serve TensorBoard on a run dir or a sweep dir (TensorBoard finds every run's `tb/`
event files below DIR).

A local DIR: this process becomes `tensorboard --logdir DIR` (exec), so Ctrl-C and kill reach TensorBoard directly.

A URI (s3://, gs://, anything `io.storage` opens): the event files are mirrored into a local dir under the cache
(`$RAY_RESNET_CACHE` or ~/.cache/ray_resnet, then tensorboard/<the URI as a file name>), TensorBoard runs on the
mirror as a child process, and this process refreshes the mirror every `refresh_s` seconds (one listing of the URI,
then only the bytes event files grew by) until TensorBoard exits; Ctrl-C or SIGTERM stops both. Every URI goes
through the mirror, s3:// included, though TensorBoard can read s3:// itself: one path reads every store with the
credentials and endpoint settings every other command uses (pyarrow's: TensorBoard reads s3:// through boto3, and
gs:// only with tensorflow installed), and it is one path to test. The cost is a local copy of the event files
(kilobytes to a few MB per run) and up to `refresh_s` of delay.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ray_resnet.config import cache_dir
from ray_resnet.errors import NoRunsError, TensorBoardError
from ray_resnet.io import storage
from ray_resnet.io.eventmirror import Changes, event_file_sizes, sync_events

# How often a mirror re-lists its URI (seconds): a run uploads its epoch events once an epoch, and its step events
# about once a minute, so 30 s shows them at most half a minute late for one listing request per 30 s.
REFRESH_S = 30.0
# How long TensorBoard gets to exit after SIGTERM before it is killed (seconds).
STOP_GRACE_S = 10


def tensorboard_argv(logdir: str, host: str, port: int) -> list[str]:
    # `python -m tensorboard.main` with this interpreter: the `tensorboard` script may not be on PATH.
    return [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", host, "--port", str(port)]


def serve(logdir: str, host: str = "127.0.0.1", port: int = 6006, refresh_s: float = REFRESH_S) -> None:
    """Serve TensorBoard on `logdir` until it is stopped. For a local dir this process is replaced by TensorBoard
    and never returns."""
    logdir = storage.absolute(logdir)
    check_has_events(logdir)
    if storage.is_uri(logdir):
        serve_mirrored(logdir, host, port, refresh_s)
        return
    print(f"TensorBoard on {logdir} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    argv = tensorboard_argv(logdir, host, port)
    os.execv(argv[0], argv)


def check_has_events(logdir: str) -> None:
    if not storage.exists(logdir):
        raise NoRunsError(f"{logdir} does not exist; pass a run dir (runs/<name>) or a sweep dir")
    if not event_file_sizes(logdir):
        raise NoRunsError(f"no TensorBoard event files under {logdir}: runs write them to <run dir>/tb once "
                          "their first epoch ends; pass a run dir or a sweep dir")


def mirror_dir(uri: str) -> Path:
    """Where a URI's event files are mirrored: a readable name, plus a hash so that URIs alike as names differ."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", uri).strip("-")[-80:]
    return cache_dir(None) / "tensorboard" / f"{readable}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


def serve_mirrored(uri: str, host: str, port: int, refresh_s: float) -> None:
    """TensorBoard as a child process on a local mirror of `uri`, refreshed every `refresh_s` s, until Ctrl-C or
    SIGTERM; TensorBoardError if TensorBoard exits on its own with an error."""
    mirror = mirror_dir(uri)
    first = sync_events(uri, mirror)
    print(f"mirrored {len(event_file_sizes(mirror))} event file(s) of {uri} into {mirror} ({_size_text(first)} "
          f"copied), refreshed every {refresh_s:g} s", flush=True)
    print(f"TensorBoard on {uri} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    with _sigterm_interrupts():
        tensorboard = subprocess.Popen(tensorboard_argv(str(mirror), host, port))
        try:
            status = keep_mirrored(uri, mirror, tensorboard, refresh_s)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: asked to stop, not a failure
            return
        finally:
            stop(tensorboard)
    if status:
        raise TensorBoardError(f"TensorBoard on the mirror of {uri} exited with status {status}; its own message "
                               "above says why (e.g. pass another --port)")


def keep_mirrored(uri: str, mirror: Path, tensorboard: subprocess.Popen, refresh_s: float) -> int:
    """Refresh the mirror every `refresh_s` s until TensorBoard exits; its exit status."""
    while True:
        try:
            return tensorboard.wait(refresh_s)
        except subprocess.TimeoutExpired:
            refresh(uri, mirror, refresh_s)


def refresh(uri: str, mirror: Path, refresh_s: float) -> None:
    try:
        changes = sync_events(uri, mirror)
    except OSError as e:  # a StorageError (a network blip) or a file deleted mid-copy: TensorBoard keeps serving
        print(f"ray-resnet tensorboard: could not refresh the mirror of {uri} ({e}); trying again in {refresh_s:g} s",
              file=sys.stderr, flush=True)
        return
    if changes:
        print(f"{time.strftime('%H:%M:%S')} mirror refreshed: {len(changes.copied)} new or grown event file(s) "
              f"({_size_text(changes)}), {len(changes.removed)} removed", flush=True)


def _size_text(changes: Changes) -> str:
    copied = sum(changes.copied.values())
    if copied < 2**10:
        return f"{copied} bytes"
    return f"{copied / 2**20:.1f} MiB" if copied >= 2**20 else f"{copied / 2**10:.1f} KiB"


def stop(process: subprocess.Popen) -> None:
    process.terminate()  # a no-op if it has exited (Ctrl-C in a terminal reaches the whole process group)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so `kill` of this process also stops its TensorBoard."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
