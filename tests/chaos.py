"""Runs inside its own process: one `ray-resnet train` run on a two-node `ray.cluster_utils.Cluster`, its run dir and
data in the tests' S3 endpoint reached through a FaultyProxy, while a seeded schedule injects faults: windows of
503 answers and of dropped connections, a killed training worker, a killed driver (the command is then rerun, as a
user or a job retry would) and a killed node (a fresh one joins after it).

`python tests/chaos.py SEED DATA_URI STORAGE_URI` prints one JSON line (prefixed `RESULT `): the faults with when
they came and how long training took to commit a new checkpoint after each, and the drivers' logs. The test
(tests/test_chaos.py) checks the run from its run dir. This process talks to the endpoint directly (the
environment's AWS_ENDPOINT_URL); the run's processes talk to the proxy.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from ray.cluster_utils import Cluster

from cluster_scenarios import HEAD_NODE, OBJECT_STORE, committed_epoch
from faulty_proxy import FaultyProxy

REPO = Path(__file__).resolve().parents[1]
NAME = "chaos"
EPOCHS = 20
# 256 train images in batches of 64 (4 steps, 2 per worker) and 200 test images: an epoch takes 2-4 s here.
SETS = ["data.train_subset=256", "data.test_subset=200", "optim.batch_size=64", "schedule.warmup_epochs=0",
        "schedule.milestones=[]", "optim.lr=0.05", "perf.eval_batch_size=200", "run.log_every_steps=2",
        f"schedule.epochs={EPOCHS}", "run.num_workers=2", "run.cpus_per_worker=1", "run.placement_strategy=SPREAD",
        "run.max_failures=10"]
FAULTS = ["503", "drop", "worker", "driver", "node", "503"]
RECOVERY_LIMIT_S = 240  # a fault the run has not recovered from by then fails the test


class Driver:
    """`ray-resnet train` on the cluster, its output in a file; rerunning the command makes a new one."""

    def __init__(self, address: str, data: str, storage: str, proxy_url: str, logs: Path, attempt: int):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(AWS_ENDPOINT_URL=proxy_url, CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        self.log_path = logs / f"driver-{attempt}.log"
        sets = [a for s in SETS for a in ("--set", s)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ray_resnet", "train", "--address", address, "--data",
                                          data, "--storage", storage, "--name", NAME, *sets],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, cwd=logs)

    @property
    def log(self) -> str:
        return self.log_path.read_text()


def training_workers(cluster: Cluster) -> list[psutil.Process]:
    """The cluster's live Ray Train worker processes (children of its raylets), by pid."""
    found = []
    for node in [cluster.head_node, *cluster.worker_nodes]:
        for info in node.all_processes.get("raylet", []):
            for p in psutil.Process(info.process.pid).children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        found.append(p)
                except psutil.Error:  # ended meanwhile
                    pass
    return sorted(found, key=lambda p: p.pid)


def main(seed: int, data: str, storage: str) -> dict:
    rng = random.Random(seed)
    faults = FAULTS[:]
    rng.shuffle(faults)
    logs = Path(tempfile.mkdtemp())
    run_dir = f"{storage}/{NAME}"
    proxy = FaultyProxy(os.environ["AWS_ENDPOINT_URL"])
    cluster = Cluster(initialize_head=True, head_node_args=HEAD_NODE)
    cluster.add_node(num_cpus=2, num_gpus=0, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    drivers = [Driver(cluster.address, data, storage, proxy.url, logs, 1)]
    injected = []
    try:
        epoch = 0
        for kind in faults:
            epoch = _wait_for_commit(epoch + rng.randint(1, 2), run_dir, drivers[-1])
            time.sleep(rng.uniform(0, 1.5))  # somewhere in the next epoch
            at, committed = time.time(), committed_epoch(run_dir)
            detail = _inject(kind, rng, cluster, proxy, drivers, data, storage, logs)
            epoch = _wait_for_commit(committed + 1, run_dir, drivers[-1])
            injected.append({"kind": kind, "after_epoch": committed, "detail": detail,
                             "recovery_s": round(time.time() - at, 1)})
        returncode = drivers[-1].proc.wait(timeout=600)
    finally:
        for driver in drivers:
            if driver.proc.poll() is None:
                driver.proc.kill()
        cluster.shutdown()
        proxy.stop()
    return {"faults": injected, "returncode": returncode, "requests_spoiled": proxy.faulted,
            "requests_forwarded": proxy.forwarded, "logs": [d.log for d in drivers]}


def _wait_for_commit(epoch: int, run_dir: str, driver: Driver) -> int:
    """Waits until the run has committed the checkpoint of `epoch` (or its last); returns the committed epoch."""
    deadline = time.time() + RECOVERY_LIMIT_S
    target = min(epoch, EPOCHS)
    while (committed := committed_epoch(run_dir)) < target:
        assert driver.proc.poll() is None, f"the driver ended early:\n{driver.log[-4000:]}"
        assert time.time() < deadline, f"no checkpoint of epoch {target} in {RECOVERY_LIMIT_S} s:\n{driver.log[-4000:]}"
        time.sleep(0.2)
    return committed


def _inject(kind: str, rng: random.Random, cluster: Cluster, proxy: FaultyProxy, drivers: list[Driver], data: str,
            storage: str, logs: Path) -> str:
    if kind in ("503", "drop"):
        seconds = round(rng.uniform(4, 8), 1)
        proxy.fault(kind, seconds)
        return f"{seconds} s window"
    if kind == "worker":
        victim = rng.choice(training_workers(cluster))
        victim.send_signal(signal.SIGKILL)
        return f"SIGKILL pid {victim.pid}"
    if kind == "driver":
        old = drivers[-1]
        old.proc.send_signal(signal.SIGKILL)
        old.proc.wait(30)
        drivers.append(Driver(cluster.address, data, storage, proxy.url, logs, len(drivers) + 1))
        return "SIGKILL, command rerun"
    node = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(num_cpus=2, num_gpus=0, object_store_memory=OBJECT_STORE)
    return "removed without notice, a new node added"


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(int(sys.argv[1]), sys.argv[2], sys.argv[3])), flush=True)
