"""A local mirror of the TensorBoard event files below a location (pure): `sync_events` brings it up to date with
one recursive listing of the location and copies only what changed.

Event files only grow: a SummaryWriter appends records, and a run's rank 0 uploads the longer file over the old one
at checkpoints and at least every minute. So a file whose size is unchanged is unchanged, and a grown file needs
only its new bytes, appended to the local copy in place: TensorBoard, which keeps its event files open and reads
on from where it stopped, then reads them as it reads a file its writer is appending to. (A copy written to a temp
file and renamed would be a new file to a reader that holds the old one open, and the temp file, named like an
event file, could be read twice.) A file that shrank was rewritten, and is copied whole; a local copy whose file
is gone is deleted.
"""

from __future__ import annotations

import dataclasses
import posixpath
from pathlib import Path

from ray_resnet.io import storage

EVENT_FILE_PREFIX = "events.out.tfevents."


@dataclasses.dataclass(frozen=True)
class Changes:
    """What one sync did: `copied` maps each file it wrote to (path relative to the mirror, with /) to the bytes it
    wrote there; `removed` lists the local copies it deleted."""

    copied: dict[str, int]
    removed: list[str]

    def __bool__(self) -> bool:
        return bool(self.copied or self.removed)


def is_event_file(path: str) -> bool:
    return posixpath.basename(path).startswith(EVENT_FILE_PREFIX)


def event_file_sizes(location: str | Path) -> dict[str, int]:
    """The event files below a location (one recursive listing): relative path -> size in bytes."""
    return {path: size for path, size in storage.file_sizes(str(location)).items() if is_event_file(path)}


def sync_events(location: str, mirror: Path) -> Changes:
    """Make `mirror` (a local dir) hold a copy of every event file below `location`, at the same relative path;
    a file already there gets only its new bytes."""
    remote, local = event_file_sizes(location), event_file_sizes(mirror)
    copied = {}
    for path, size in remote.items():
        have = local.get(path, 0)
        if size != have:
            copied[path] = _copy_tail(storage.join(location, path), mirror / path, have if size > have else 0)
    removed = sorted(set(local) - set(remote))
    for path in removed:
        (mirror / path).unlink()
    return Changes(copied, removed)


def _copy_tail(location: str, target: Path, offset: int) -> int:
    """Write `location`'s bytes from `offset` on to `target` at the same offset; how many bytes were written."""
    data = storage.read_from(location, offset)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "ab" if offset else "wb") as f:
        f.write(data)
    return len(data)
