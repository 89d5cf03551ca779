"""Files the project writes and reads back (pure): every write is atomic and durable.

A reader (a rerun, a resume, `report`) sees either the previous file or the complete new one, never a torn one,
even after a crash or a power loss: the bytes go to a temp file in the same directory, are fsynced, and the temp
file is renamed over the target (then the directory is fsynced, so the rename itself survives).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: it replaces `path` only when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, text.encode())


def read_json(path: str | Path) -> dict | None:
    """The JSON object in `path`; None if there is none or it is unreadable (e.g. written by an older version that
    wrote in place and crashed mid-write): callers treat that like a missing file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
