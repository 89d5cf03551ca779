"""One writer per run dir and sweep dir: a lease, taken before anything in the dir is read or written and held with a
heartbeat while the driver lives (pure: no Ray). The dir is a local path or a URI (see storage.py).

One algorithm for every store, because an object store through pyarrow has no conditional create: each contender
writes an object of its own, `<dir>/.lease/<id>.json` (host, pid, when), then lists `.lease/`. The holder is the
earliest claim by the STORE's modification time (the server's clock: no client clock skew), ties broken by id. An
object store keeps times in whole seconds and a PUT shows in listings only once complete, so the earliest waits
`settle_s` and lists again before it counts itself the holder: two contenders within the same second then agree. A
local dir's times have sub-millisecond resolution and a claim shows once renamed into place, so it settles for
`local_settle_s`.
Losers delete their claim and are refused. The holder rewrites `<id>.beat` every `beat_s`, so its claim's own time
never changes. A claim counts as gone (and is deleted by the next contender, who may then take the dir) when its
latest beat is older than `stale_s` by the store's clock, or at once when it comes from this machine and its process
has ended: a killed driver rerun at once resumes without waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ray_resnet.errors import DirInUseError, StorageError
from ray_resnet.io import storage
from ray_resnet.io.storage import ListedFile

LEASE_DIR = ".lease"
CLAIM, BEAT = ".json", ".beat"
STORE_TIME_RESOLUTION_S = 1.0  # S3 keeps modification times in whole seconds
LOCAL_TIME_RESOLUTION_S = 0.01  # a kernel's coarse file clock ticks every 1-10 ms


@dataclass(frozen=True)
class Timing:
    """How a lease beats and when it counts as gone (seconds).

    beat_s 10: a rewrite of one tiny object per 10 s (8,640 PUTs a day on S3); stale_s 60: a beat may wait up to
    storage.ANSWER_TIMEOUT_S (20 s) for a slow store before it fails, so 60 s is such a hung request plus 3 missed
    beats; a rerun on another machine after its driver died waits at most that minute (on the same machine: none).
    settle_s 2: an object store's 1 s time resolution plus the time a small PUT takes to show in a listing (less
    than that resolution lets a claim of the same second as the holder's win the tie after the holder settled).
    local_settle_s 0.5: on a local dir a claim is written, then renamed into place; a contender descheduled between
    the two (a loaded machine: tens of milliseconds) shows its earlier claim within that bound."""

    beat_s: float = 10.0
    stale_s: float = 60.0
    settle_s: float = 2.0
    local_settle_s: float = 0.5


@dataclass(frozen=True)
class Holder:
    """A claim on a dir: who wrote it and, by the store's clock (seconds since the Unix epoch), when it was written
    (`claimed_s`) and when it last beat (`beat_s`)."""

    id: str
    host: str
    pid: int
    machine: str  # the host and its pid namespace: where `pid` names this process
    process_start: str | None  # the kernel's start time of `pid` (Linux): a reused pid is another process
    claimed_s: float
    beat_s: float

    def age_s(self, now_s: float) -> float:
        return max(0.0, now_s - self.beat_s)

    def describe(self, now_s: float) -> str:
        """`pid 123 on host h since 2026-12-06 15:20:01 UTC (heartbeat 4 s ago)`."""
        return (f"pid {self.pid} on host {self.host} since {utc_text(self.claimed_s)} "
                f"(heartbeat {self.age_s(now_s):.0f} s ago)")


def utc_text(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks after boot, from /proc); None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _this_machine() -> str:
    """Where a pid means one process: the host name and, where /proc tells, the pid namespace (two containers may
    share a host name)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}"


def _process_alive(pid: int, process_start: str | None) -> bool:
    if Path("/proc/self/stat").exists():
        return process_start is not None and _process_start(pid) == process_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def is_gone(holder: Holder, now_s: float, stale_s: float) -> bool:
    """Whether a claim's writer is gone: no beat for `stale_s` by the store's clock, or, on this machine, its
    process has ended."""
    if holder.age_s(now_s) > stale_s:
        return True
    return holder.machine == _this_machine() and not _process_alive(holder.pid, holder.process_start)


def holders_from(listed: list[ListedFile], claims: dict[str, bytes | None]) -> list[Holder]:
    """The claims of a `.lease/` dir, earliest first: `listed` is its listing (paths under it), `claims` the bytes of
    its `<id>.json` files by path (None: deleted since the listing)."""
    times = {f.path: f.mtime_s for f in listed}
    holders = []
    for path, data in claims.items():
        record = storage.parse_json(data)
        if not path.endswith(CLAIM) or record is None or path not in times:
            continue
        claim_id = path[:-len(CLAIM)]
        claimed_s = times[path]
        holders.append(Holder(claim_id, str(record.get("host")), int(record.get("pid", -1)),
                              str(record.get("machine")), record.get("process_start"), claimed_s,
                              max(claimed_s, times.get(claim_id + BEAT, 0.0))))
    return sorted(holders, key=lambda h: (h.claimed_s, h.id))


def live_holder(directory: str, timing: Timing = Timing(), now_s: float | None = None) -> Holder | None:
    """Who holds the dir now (None: nobody, or only writers that are gone), by this machine's clock."""
    lease_dir = storage.join(directory, LEASE_DIR)
    listed = storage.walk(lease_dir)
    paths = [f.path for f in listed if f.path.endswith(CLAIM)]
    claims = dict(zip(paths, storage.read_files([storage.join(lease_dir, p) for p in paths])))
    now_s = time.time() if now_s is None else now_s
    live = [h for h in holders_from(listed, claims) if not is_gone(h, now_s, timing.stale_s)]
    return live[0] if live else None


def _missing_dirs(directory: Path) -> list[Path]:
    """A local dir and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    return missing


class Lease:
    """This process's claim on a dir; `take` makes it the holder or raises DirInUseError."""

    def __init__(self, directory: str, what: str, fix: str, timing: Timing):
        self.directory, self.what, self.fix, self.timing = directory, what, fix, timing
        self.id = uuid.uuid4().hex
        self.lease_dir = storage.join(directory, LEASE_DIR)
        self.claim = storage.join(self.lease_dir, self.id + CLAIM)
        self.beat = storage.join(self.lease_dir, self.id + BEAT)
        on_store = storage.is_uri(directory)
        self.missing_dirs = [] if on_store else _missing_dirs(Path(directory))
        self.settle_s = timing.settle_s if on_store else timing.local_settle_s
        self.time_resolution_s = STORE_TIME_RESOLUTION_S if on_store else LOCAL_TIME_RESOLUTION_S
        self._released = threading.Event()
        self._beating: threading.Thread | None = None

    def take(self) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "machine": _this_machine(),
                  "process_start": _process_start(os.getpid()), "started": utc_text(time.time())}
        try:  # a holder releasing just now may remove the empty local .lease/ between its mkdir and the write
            storage.write_text(self.claim, json.dumps(record) + "\n")
        except FileNotFoundError:
            storage.write_text(self.claim, json.dumps(record) + "\n")
        try:
            first, now_s = self._earliest_live()
            # A claim this new (this one's, or a contender's that may yet lose) may still be preceded by one of the
            # same second that does not show yet: look again once it would.
            if first.id == self.id or now_s - first.claimed_s <= self.settle_s + self.time_resolution_s:
                time.sleep(self.settle_s)
                first, now_s = self._earliest_live()
            if first.id != self.id:
                raise DirInUseError(self._refusal(first, now_s))
        except BaseException:
            self._delete_own()
            raise
        self._beating = threading.Thread(target=self._beat_until_released, name=f"lease {self.id}", daemon=True)
        self._beating.start()

    def _earliest_live(self) -> tuple[Holder, float]:
        """The earliest claim whose writer is not gone (after deleting those of writers that are), and the store's
        time now (seconds since the Unix epoch): that of this process's own beat, written first."""
        storage.write_text(self.beat, utc_text(time.time()))
        listed = storage.walk(self.lease_dir)
        paths = [f.path for f in listed if f.path.endswith(CLAIM)]
        claims = dict(zip(paths, storage.read_files([storage.join(self.lease_dir, p) for p in paths])))
        now_s = next((f.mtime_s for f in listed if f.path == self.id + BEAT), time.time())
        live = []
        for holder in holders_from(listed, claims):
            if holder.id != self.id and is_gone(holder, now_s, self.timing.stale_s):
                self._delete(holder.id)
            else:
                live.append(holder)
        if not any(h.id == self.id for h in live):
            raise DirInUseError(f"{self.what} {self.directory}: this driver's lease claim was deleted by another "
                                f"driver as stale; {self.fix}")
        return live[0], now_s

    def _refusal(self, holder: Holder, now_s: float) -> str:
        text = f"{self.what} {self.directory} is in use by {holder.describe(now_s)}: {self.fix}"
        if holder.machine != _this_machine():  # its process cannot be checked from here: only its beats tell
            text += f" (should that driver be gone, its lease lapses {self.timing.stale_s:.0f} s after its last beat)"
        return text

    def _delete(self, claim_id: str) -> None:
        for suffix in (CLAIM, BEAT):  # the claim first: a beat alone is never read as a claim
            with contextlib.suppress(FileNotFoundError):
                storage.remove(storage.join(self.lease_dir, claim_id + suffix))

    def _delete_own(self) -> None:
        self._delete(self.id)
        if not storage.is_uri(self.directory):  # local dirs the lease alone made are not left behind empty
            for made in (self.lease_dir, *self.missing_dirs):
                with contextlib.suppress(OSError):  # not empty: another driver's claim, or the run's files
                    os.rmdir(made)

    def _beat_until_released(self) -> None:
        warned = False
        while not self._released.wait(self.timing.beat_s):
            try:
                storage.write_text(self.beat, utc_text(time.time()))
                if not storage.is_file(self.claim):
                    print(f"warning: the lease on {self.what} {self.directory} was taken over by another driver (this "
                          "one missed its beats): both now write there; stop one of them", file=sys.stderr, flush=True)
                    return
                warned = False
            except (StorageError, OSError) as e:
                if not warned:  # once per run of failures: the next beat may well get through
                    print(f"warning: lease heartbeat on {self.directory} failed: {e}", file=sys.stderr, flush=True)
                warned = True

    def release(self) -> None:
        self._released.set()
        if self._beating is not None:
            self._beating.join()
        self._delete_own()


@contextlib.contextmanager
def held(directory: str, what: str, fix: str, timing: Timing = Timing()) -> Iterator[Lease]:
    """Hold the lease on `directory` for the block (released at its end, also on an error); raises DirInUseError
    naming the holder if a live driver holds it. `what` names the dir in messages ("run dir"), `fix` says what to
    do instead ("wait for it to end, or pick another --name")."""
    lease = Lease(directory, what, fix, timing)
    lease.take()
    try:
        yield lease
    finally:
        lease.release()
