"""Runs inside its own process: a two-node `ray.cluster_utils.Cluster` and training runs on it, one after another.

`python tests/cluster_scenarios.py NAME DATA_ROOT STORAGE [NAME DATA_ROOT STORAGE ...]` (NAME: spread, s3,
remove_node or elastic) prints one JSON line (prefixed `RESULT `) with each scenario's result; tests call it through
`run_scenarios`. Scenarios share the cluster (its start costs about 17 s on 2 cores); one that takes the second
node away (remove_node, elastic) comes last. A test process that already has a Ray session cannot also host a
Cluster, hence the subprocess.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import ray.train
import torch
from ray.cluster_utils import Cluster

from ray_resnet.config import load_config
from ray_resnet.core.batches import take_subset
from ray_resnet.core.checkpoint import load_checkpoint
from ray_resnet.core.datasets import load_cifar
from ray_resnet.core.loop import Hooks
from ray_resnet.core.models import build_model
from ray_resnet.core.steps import LabeledImages, evaluate
from ray_resnet.io import storage as storage_lib

STEPS_PER_EPOCH = 4  # data.train_subset 256 / optim.batch_size 64
OBJECT_STORE = 300 * 1024**2  # bytes per node; cluster_utils' default (150 MiB) makes ray.put spill to disk


def _config(root: str, storage: str, name: str, epochs: int, *sets: str):
    return load_config(None, [
        f"data.root={root}", f"run.storage={storage}", f"run.name={name}", f"schedule.epochs={epochs}",
        "data.train_subset=256", "data.test_subset=200", "optim.batch_size=64", "schedule.warmup_epochs=0", "schedule.milestones=[]",
        "optim.lr=0.05", "perf.eval_batch_size=200", "run.num_workers=2", "run.cpus_per_worker=1",
        "run.placement_strategy=SPREAD", "run.max_failures=2", *sets,
    ])


# num_gpus=0: CPU nodes also on a machine with a GPU; no dashboard: 8265 may be taken. A killed node is declared
# dead after 3 missed health checks 1 s apart (Ray's default: 5, 3 s apart), so Ray Train sees the loss before it
# asks for the lost node's CPUs again.
HEAD_NODE = {"num_cpus": 2, "num_gpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False,
             "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}}

# The elastic run: [1, 2] workers of 2 CPUs (one per node), a resize check every 5 s, and no restart allowed for
# failures (max_failures 0): the node it loses is preempted (drained by the cluster first, as an autoscaler does
# with a reclaimed spot node).
ELASTIC = ["run.num_workers=[1,2]", "run.cpus_per_worker=2", "run.resize_interval_s=5", "run.max_failures=0",
           "schedule.warmup_epochs=1", "perf.amp=fp32"]  # fp32: the epoch times below (bf16 on AMX halves them)
# 10-15 s each in float64 on 2 AMD EPYC cores: epoch 1 with 2 workers before the node loss, epoch 2 (3 if the
# loss came late) with 1 worker, which then waits for the node (WaitsAloneForTheNode), the rest with 2 again
ELASTIC_EPOCHS = 4


def in_float64(hooks: list) -> list:
    """`hooks`, made where the worker then trains in float64 (its default dtype, set before the model is built): float
    order then moves a loss by ~1e-12 instead of float32's 1e-4 (test_worker_count), whatever the CPU."""
    torch.set_default_dtype(torch.float64)
    return hooks


class WorkerGroupLog(Hooks):
    """Rank 0 appends `time world_size epoch` to a file at a worker group's first step: the run's resize
    timeline (when training goes on, with how many workers, from which epoch)."""

    def __init__(self, path: str):
        context = ray.train.get_context()
        self.path, self.world = path, context.get_world_size()
        self.logged = context.get_world_rank() != 0

    def step_end(self, step, images, loss, lr):
        if not self.logged:
            with open(self.path, "a") as f:
                f.write(f"{time.time()} {self.world} {(step - 1) // STEPS_PER_EPOCH + 1}\n")
            self.logged = True


class WaitsAloneForTheNode(Hooks):
    """A 1-worker group, once it has trained an epoch, waits at the next epoch's first step until Ray Train replaces
    it with a grown group (at most 120 s): however long the node takes to come back, the run trains no more epochs
    alone than the test compares."""

    def __init__(self):
        self.alone, self.first_epoch = ray.train.get_context().get_world_size() == 1, None

    def step_end(self, step, images, loss, lr):
        epoch = (step - 1) // STEPS_PER_EPOCH + 1
        self.first_epoch = self.first_epoch or epoch
        if self.alone and epoch > self.first_epoch:
            time.sleep(120)


def _group_starts(path: str) -> list[tuple[float, int, int]]:
    if not os.path.exists(path):
        return []
    return [(float(t), int(w), int(e)) for t, w, e in (line.split() for line in Path(path).read_text().splitlines())]


def _preempt(cluster: Cluster, node) -> None:
    """Drain `node` as the autoscaler does before a spot instance is reclaimed, then kill it as the cloud does (a
    graceful stop would make the node's own SIGTERM handler report an expected termination instead)."""
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.address)
    accepted, why = gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "preempted by the test", int(time.time() * 1000) + 2000)
    assert accepted, why
    cluster.remove_node(node, allow_graceful=False)


def _elastic(cluster: Cluster, worker, root: str, storage: str) -> dict:
    """Lose the second node after epoch 1 is committed, run on with 1 worker, get a node back and grow to 2."""
    from ray_resnet.raytrain.driver import run_training

    # A worker group asked for more workers than the cluster still has gives up after this (seconds; Ray's default
    # 60; it waits for the placement group alone, which takes well under a second where it fits), and the next try
    # asks for what fits.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "5"
    groups = os.path.join(tempfile.mkdtemp(), "groups.txt")
    cfg = _config(root, storage, "elastic", ELASTIC_EPOCHS, *ELASTIC)
    box: dict = {}
    fit = threading.Thread(target=lambda: box.update(summary=_catch(
        run_training, cfg, None, None, None, lambda: in_float64([WorkerGroupLog(groups), WaitsAloneForTheNode()]))))
    fit.start()
    run_dir = storage_lib.join(storage, "elastic")
    while fit.is_alive() and committed_epoch(run_dir) < 1:
        time.sleep(0.2)
    lost_at = time.time()
    _preempt(cluster, worker)
    while fit.is_alive() and not _alone_from(groups, lost_at):
        time.sleep(0.2)
    alone_from = _alone_from(groups, lost_at) or ELASTIC_EPOCHS
    while fit.is_alive() and committed_epoch(run_dir) < alone_from:  # the epoch trained alone is the one compared
        time.sleep(0.2)
    added_at = time.time()
    cluster.add_node(num_cpus=2, num_gpus=0, object_store_memory=OBJECT_STORE)
    fit.join(timeout=400)
    # The same run without a resize, up to the epoch the 1-worker group trained (the learning rate of an epoch does
    # not depend on the run's length).
    undisturbed = _catch(run_training, _config(root, storage, "undisturbed", alone_from, *ELASTIC), None, None, None,
                         lambda: in_float64([]))
    return {"summary": box.get("summary"), "undisturbed": undisturbed, "lost_at": lost_at, "added_at": added_at,
            "groups": _group_starts(groups)}


def _alone_from(groups: str, lost_at: float) -> int | None:
    """The first epoch of the 1-worker group started after the node loss, once it has stepped."""
    return next((epoch for t, w, epoch in _group_starts(groups) if t > lost_at and w == 1), None)


def committed_epoch(run_dir: Path | str) -> int:
    """Epoch of the latest checkpoint Ray Train has committed (the one it would resume from); 0 if none. `run_dir`
    may be a URI (this process then needs the store's settings in its environment)."""
    snapshot = storage_lib.read_json(storage_lib.join(run_dir, "checkpoint_manager_snapshot.json")) or {}
    try:
        return snapshot["latest_checkpoint_result"]["metrics"]["epoch"]
    except (KeyError, TypeError):  # not there yet
        return 0


SCENARIO = "SCENARIO"  # the line each scenario's part of the log starts with
TAKE_THE_SECOND_NODE = {"remove_node", "elastic"}


def run_script(script: str, argv: list[str], env: dict | None = None) -> tuple[dict, str]:
    """`script` with `argv` in a fresh Python process (with `env` added to its environment): the JSON of its
    `RESULT ` line, and its whole log (stdout and stderr in the order they were written)."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    tests = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tests.parent), str(tests), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, script, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600, cwd=tempfile.mkdtemp())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-6000:]
    return json.loads(lines[-1][len("RESULT "):]), proc.stdout


def run_scenarios(runs: list[tuple[str, Path | str, Path | str]], env: dict | None = None) -> dict[str, dict]:
    """Each (name, data root, storage) scenario in order, on one two-node cluster in a fresh process: its result, with
    its own part of the log under "log". Roots and storages may be URIs."""
    results, log = run_script(__file__, [str(part) for run in runs for part in run], env)
    logs = dict(part.split("\n", 1) for part in log.split(f"{SCENARIO} ")[1:])
    return {name: {**result, "log": logs[name]} for name, result in results.items()}


def single_process_test_acc(cfg, checkpoint: str) -> float:
    """The checkpoint's accuracy on the run's test subset, computed here in one process."""
    state = load_checkpoint(checkpoint)
    images, labels = load_cifar(cfg.data.root, "test", cfg.data.dataset, False, cfg.data.cache_dir)
    keep = take_subset(labels, cfg.data.test_subset, cfg.seed)
    model = build_model(cfg.model, 10)
    model.load_state_dict(state.model)
    return evaluate(model, LabeledImages(images[keep], labels[keep]), batch_size=200)["acc"]


def main(runs: list[tuple[str, str, str]]) -> dict[str, dict]:
    assert not TAKE_THE_SECOND_NODE & {name for name, _, _ in runs[:-1]}, f"{runs}: only the last may take a node"
    cluster = Cluster(initialize_head=True, head_node_args=HEAD_NODE)
    worker = cluster.add_node(num_cpus=2, num_gpus=0, object_store_memory=OBJECT_STORE)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        node_ids = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        results = {}
        for name, root, storage in runs:
            print(f"{SCENARIO} {name}", flush=True)
            results[name] = {**_scenario(cluster, worker, name, root, storage), "cluster_nodes": node_ids}
        return results
    finally:
        ray.shutdown()
        cluster.shutdown()


def _scenario(cluster: Cluster, worker, scenario: str, root: str, storage: str) -> dict:
    from ray_resnet.raytrain.driver import run_training

    if scenario == "elastic":
        return _elastic(cluster, worker, root, storage)
    cfg = _config(root, storage, scenario, epochs=4 if scenario == "remove_node" else 2)
    if scenario != "remove_node":
        out = {"summary": _catch(run_training, cfg)}
    else:  # remove the second node mid-run; add_node/remove_node must run on the main thread
        box: dict = {}
        fit = threading.Thread(target=lambda: box.update(summary=_catch(run_training, cfg)))
        fit.start()
        run_dir = storage_lib.join(storage, scenario)
        while fit.is_alive() and committed_epoch(run_dir) < 1:
            time.sleep(0.2)
        removed_at = time.time()
        cluster.remove_node(worker)
        fit.join(timeout=400)
        out = {"summary": box.get("summary"), "removed_at": removed_at}
    summary = out["summary"]
    if isinstance(summary, dict) and summary.get("checkpoint"):
        out["single_process_test_acc"] = single_process_test_acc(cfg, summary["checkpoint"])
        out["worker_nodes"] = summary["worker_nodes"]
    return out


def _catch(fn, *args):
    """`fn`'s RunResult as its result.json content (it crosses a process as JSON), or its error in a line."""
    try:
        return json.loads(fn(*args).to_json())
    except Exception as e:  # reported to the test, which checks the message
        return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    args = sys.argv[1:]
    print("RESULT " + json.dumps(main([tuple(args[i:i + 3]) for i in range(0, len(args), 3)])), flush=True)
