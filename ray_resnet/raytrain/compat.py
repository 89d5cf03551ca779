"""Every use of Ray's private modules, in one place: checked against Ray 2.60.0 (Train V2). Each falls back to
doing nothing (or a plain answer) where a later Ray moved the name, so a Ray upgrade costs a log line or a path in
an error message, never a run.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import ray

# Ray Train V2's per-worker modules whose INFO logs repeat every report's metrics and checkpoint path.
_CHATTY_TRAIN_MODULES = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")
PEER_CHECK_EVERY_S = 0.5


def quiet_ray_train_logs() -> None:
    """Worker-side Ray Train logs to WARNING (rank 0 prints its own epoch line; the controller's logs, e.g. why a
    worker group was restarted, stay at INFO). A module that is not there is left alone."""
    for module in _CHATTY_TRAIN_MODULES:
        logger = getattr(sys.modules.get(module), "logger", None)
        if logger:
            logger.setLevel(logging.WARNING)


def worker_logs_dir() -> str:
    """Where Ray Train's per-worker logs are, on each node of the connected cluster."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "global_worker", None)
    node = getattr(node, "node", None)  # the driver's node; the same layout holds on every node
    if node is None:  # connected through ray:// (Ray Client), or a Ray that moved it: the default session dir
        return "/tmp/ray/session_latest/logs/train/ on each node"
    return f"{Path(node.get_session_dir_path()) / 'logs' / 'train'}/ on each node"


# Ray Train's controller errors for a worker group that did not start, private classes in Ray 2.60
# (ray.train.v2._internal.exceptions): told apart by name, so a Ray that renames them only loses the specific line.
_START_FAILURES = {"WorkerGroupStartupTimeoutError": "timeout", "WorkerGroupStartupFailedError": "failed"}


def worker_group_start_failure(controller_failure: Exception) -> str | None:
    """"timeout" where a ControllerError's cause is a worker group whose resources never came within the start
    timeout, "failed" where its workers failed to start, else None."""
    return _START_FAILURES.get(type(controller_failure).__name__)


def wait_for_ray_to_see_a_lost_peer(peers: dict[str, str], limit_s: float) -> str:
    """After a collective failed because a peer vanished, ask Ray what became of the peers (`peers`: the other
    ranks' actor ids and their node ids), every 0.5 s for at most `limit_s`. Returns:
    - "node": a peer's node is gone. This worker then waits out `limit_s`, in which Ray's controller stops it for the
      lost node, so the loss is booked as what it was (a preempted node: the preemption budget) and not as this
      worker's error (run.max_failures);
    - "process": a peer's process died on a live node (a crash, a kill), said at once: a worker failure either way;
    - "unknown": neither within `limit_s` (every peer still alive: a network fault)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        dead = [actor for actor in peers if _actor_state(actor) == "DEAD"]  # before the nodes: Ray marks a lost
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}  # node dead before the actors on it
        if set(peers.values()) - alive:
            time.sleep(max(0.0, deadline - time.monotonic()))  # Ray stops this worker meanwhile
            return "node"
        if dead:
            return "process"
        time.sleep(PEER_CHECK_EVERY_S)
    return "unknown"


def _actor_state(actor_id: str) -> str:
    """An actor's state in Ray's GCS ("ALIVE", "RESTARTING", "DEAD", ...), read without the dashboard; "" where a
    later Ray moved the call."""
    try:
        return ray._private.state.actors(actor_id=actor_id).get("State", "")
    except (AttributeError, TypeError):
        return ""
