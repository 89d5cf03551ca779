"""Memory (and CPU time) of a process tree from /proc (Linux), without double-counting shared pages.

RSS counts a page once in every process that maps it, so N Ray workers mapping the same object-store
dataset would show it N times. PSS splits each shared page between its mappers (sums to the real total);
USS (private pages) is what a process holds on its own; HWM is the kernel's peak RSS of the process.
"""

from __future__ import annotations

import os
from pathlib import Path

_ROLLUP_KEYS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss"}
KEYS = ("rss", "pss", "uss", "hwm")


def process_memory(pid: int) -> dict[str, int] | None:
    """{"rss", "pss", "uss", "hwm"} in bytes; None if the process is gone."""
    out = dict.fromkeys(KEYS, 0)
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in rollup.splitlines()[1:] + [s for s in status.splitlines() if s.startswith("VmHWM:")]:
        key, _, value = line.partition(":")
        key = "hwm" if key == "VmHWM" else _ROLLUP_KEYS.get(key)
        if key:
            out[key] += int(value.split()[0]) * 1024  # /proc says kB
    return out


def object_store_pages(pid: int) -> dict[str, int]:
    """{"store_rss", "store_pss"}: bytes of Ray's object store (the /dev/shm/plasma* mapping) the process has
    mapped, and its share of them. A zero-copy ray.get of the dataset shows up here, not in USS."""
    out = {"store_rss": 0, "store_pss": 0}
    in_store = False
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line: address range ... path
            in_store = "/plasma" in line
        elif in_store and first in ("Rss:", "Pss:"):
            out["store_" + first[:-1].lower()] += int(line.split()[1]) * 1024
    return out


def process_tree(root: int) -> dict[int, str]:
    """pid -> command line for `root` and all its descendants (Ray's daemons and workers descend from the driver)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - tree
        tree |= frontier
    names = {}
    for pid in tree:
        try:
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return names


def tree_memory(root: int | None = None, watch: str | None = None) -> dict:
    """{"total": sums over the tree of `root` (default: this process), "watched": [per process whose command line
    starts with `watch`]}, in bytes."""
    total, watched = dict.fromkeys(KEYS, 0), []
    for pid, name in process_tree(root or os.getpid()).items():
        mem = process_memory(pid)
        if mem is None:
            continue
        for key in KEYS:
            total[key] += mem[key]
        if watch and name.startswith(watch):
            watched.append({**mem, **object_store_pages(pid)})
    return {"total": total, "watched": watched}


def tree_cpu_seconds(root: int, exclude_pids: set[int] = frozenset(), exclude_prefix: str | None = None) -> float:
    """CPU seconds (user + system) used so far by the tree of `root`, minus some processes: measured around the
    timed steps, what helper processes (DataLoader workers; Ray's driver and daemons) take from the cores."""
    ticks = 0
    for pid, name in process_tree(root).items():
        if pid in exclude_pids or (exclude_prefix and name.startswith(exclude_prefix)):
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")
