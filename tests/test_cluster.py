"""Clusters, offline: Ray's own validation of cluster/*.yaml, `ray job submit` to a real local head (token auth
on), and a two-node simulated cluster with SPREAD placement.

The head and the simulated cluster are separate processes with their own ports and temp dirs, stopped by pid
(never `ray stop`, which would stop every Ray on the machine).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from ray_resnet.core.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray and ray-resnet of this environment
pytestmark = pytest.mark.ray
CLUSTER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))


def _validated(path_or_dict) -> dict:
    raw = yaml.safe_load(path_or_dict.read_text()) if isinstance(path_or_dict, Path) else path_or_dict
    cfg = prepare_config(raw)
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validation_and_is_safe(path):
    cfg = _validated(path)
    text = path.read_text()
    assert cfg["file_mounts"]["~/ray-resnet"] == "." and ".gitignore" in cfg["rsync_filter"]
    # The package on every node: setup_node.sh installs it (tests/test_gpu_cluster.py runs the script).
    assert all(any(c.startswith("bash ~/ray-resnet/cluster/setup_node.sh") for c in cfg[key])
               for key in ("head_setup_commands", "worker_setup_commands"))
    setup = " ".join(cfg["head_setup_commands"] + cfg["worker_setup_commands"])  # setup_commands included
    nodes = [t["node_config"] for t in cfg["available_node_types"].values()]
    head, workers = _head_and_workers(cfg)
    if cfg["provider"]["type"] == "aws":  # run dirs in S3: the head's profile may start workers, theirs only the bucket
        assert "<RAY_RESNET_HEAD_PROFILE>" in head["IamInstanceProfile"]["Arn"]
        assert all("<RAY_RESNET_WORKER_BUCKET_PROFILE>" in n["IamInstanceProfile"]["Arn"] for n in workers)
        assert "s3://<BUCKET>/runs" in text and "/mnt/shared" not in setup  # EFS only as the commented alternative
    elif cfg["provider"]["type"] == "gcp":
        assert "<RAY_RESNET_HEAD_SA>" in head["serviceAccounts"][0]["email"]
        assert all("<RAY_RESNET_WORKER_SA>" in n["serviceAccounts"][0]["email"] for n in workers)
        # Their own network, not `default`; an external IP on the head alone, the firewall's tags on every node.
        assert all(n["networkInterfaces"][0]["subnetwork"].endswith("/subnetworks/ray-resnet") for n in nodes)
        assert head["networkInterfaces"][0]["accessConfigs"]
        assert not any(n["networkInterfaces"][0].get("accessConfigs") for n in workers)
        assert all("ray-resnet" in n["tags"]["items"] for n in nodes)
        assert "gs://<BUCKET>/runs" in text and "/mnt/shared" not in setup
    else:
        assert "/mnt/shared" in setup  # on-premise: the NFS export
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    assert "0.0.0.0" not in text  # nothing listens on, or is opened to, every address
    if cfg["provider"]["type"] == "aws":
        rules = cfg["provider"]["security_group"]["IpPermissions"]
        assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    if cfg["provider"]["type"] != "local":
        gpu = [t for t in cfg["available_node_types"].values() if "guestAccelerators" in t["node_config"]
               or t["node_config"].get("InstanceType", "").startswith(("g5", "g6"))]
        assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1  # autoscaling GPU workers


def _head_and_workers(cfg: dict) -> tuple[dict, list[dict]]:
    types = cfg["available_node_types"]
    return (types[cfg["head_node_type"]]["node_config"],
            [t["node_config"] for name, t in types.items() if name != cfg["head_node_type"]])


def test_cluster_validation_catches_mistakes():
    cfg = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    with pytest.raises(ValidationError, match="'max_wrkers' was unexpected"):
        _validated({**cfg, "max_wrkers": 2})


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the head (it stops its own Ray processes), then SIGKILL whatever it left behind."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()


def _repo_copy_with_junk(dest: Path) -> Path:
    """This checkout (without its real, huge .venv) plus a fake .venv/ and runs/ that must not be uploaded."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "__pycache__"))
    for junk in (".venv/lib/big.bin", "runs/old/checkpoint.pt"):
        (dest / junk).parent.mkdir(parents=True)
        (dest / junk).write_bytes(b"x" * 1024)
    return dest


def test_ray_job_submit_trains_on_a_real_head(real_cifar_small, tmp_path):
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, objects = _free_ports(9)
    temp_dir = Path(tempfile.mkdtemp(prefix="rr5-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    address = f"http://127.0.0.1:{dashboard}"
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={objects}",  # none of Ray's defaults:
         f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0",                      # others' Rays hold them;
         "--disable-usage-stats"],                                                        # CPU on a GPU machine too
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        deadline = time.time() + 180
        while True:  # the Jobs API answers once the dashboard is up
            try:
                urllib.request.urlopen(request, timeout=5)
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
                time.sleep(1)

        # Token auth is on: a client without RAY_AUTH_MODE=token is refused.
        no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        refused = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=no_token,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

        workdir = _repo_copy_with_junk(tmp_path / "checkout")
        storage = tmp_path / "shared-runs"
        submit = [BIN / "ray", "job", "submit", "--address", address, "--submission-id", "smoke-1",
                  "--working-dir", ".", "--", "ray-resnet", "train", "-c", "configs/cifar10_resnet32.yaml",
                  "--smoke-test", "--model", "resnet20", "--data", str(real_cifar_small), "--storage", str(storage),
                  "--name", "job", "--set", "data.train_subset=256", "--set", "data.test_subset=200"]
        for _ in range(30):  # the head's job agent starts a few seconds after the dashboard answers
            start = time.perf_counter()
            job = subprocess.run(submit, cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
            wall_s = time.perf_counter() - start
            if "No available agent" not in job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        status = subprocess.run([BIN / "ray", "job", "status", "--address", address, "smoke-1"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert "Job 'smoke-1' succeeded" in status.stdout  # JobStatus.SUCCEEDED
        assert "done: job-smoke (resnet20" in job.stdout  # --smoke-test runs under <name>-smoke
        # RAY_TRAIN_ENABLE_PRINT_PATCH=0 reached the head's workers (with Ray's default, every line shows twice).
        assert len([line for line in job.stdout.splitlines() if "epoch   1/1  train loss" in line]) == 1

        run_dir = storage / "job-smoke"
        result = json.loads((run_dir / "result.json").read_text())
        assert result["epoch"] == 1 and load_checkpoint(result["checkpoint"]).epoch == 1
        assert list((run_dir / "tb").glob("events.out.tfevents.*"))
        uploaded = [d for d in temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if d.is_dir()]
        assert uploaded and all((d / "ray_resnet" / "raytrain" / "driver.py").is_file() for d in uploaded)
        assert not [p for d in uploaded for p in d.rglob("*") if p.name in (".venv", "runs")]  # .gitignore honoured
        print(f"\n[job submit] ray job submit -> SUCCEEDED in {wall_s:.1f}s (submit to exit)")
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_nodes_spread_workers_and_agree_on_test_accuracy(two_node_runs):
    out = two_node_runs["spread"]
    summary = out["summary"]
    assert summary["epoch"] == 2
    assert sorted(out["worker_nodes"]) == out["cluster_nodes"]  # rank 0 and rank 1 on different nodes
    # The accuracy both ranks computed on their halves of the test set equals one process's on all of it, up to
    # borderline top-1 flips: the ranks ran channels_last on 100 images each, single_process_test_acc contiguous on
    # 200, so their float32 logits round differently; 1 image is 0.5 points.
    assert summary["final_test_acc"] == pytest.approx(out["single_process_test_acc"], abs=1.01)  # <= 2 of 200


@pytest.mark.usefixtures("ray_local")
def test_autoscaling_clusters_skip_the_fit_check_and_ask_for_gpus():
    from ray_resnet.config import load_config
    from ray_resnet.errors import RunError
    from ray_resnet.raytrain.cluster import plan_resources

    # 4 GPU workers on this 2-CPU, 0-GPU Ray: refused at once, unless the cluster adds GPU nodes on demand.
    with pytest.raises(RunError, match="do not fit"):
        plan_resources(load_config(None, ["run.num_workers=4", "run.device=cuda"]))
    assert plan_resources(load_config(None, ["run.num_workers=4", "run.autoscaling=true"])) == (
        True, {"CPU": 1, "GPU": 1}, 1)
    assert plan_resources(load_config(None, ["run.num_workers=4", "run.autoscaling=true", "run.device=cpu",
                                             "run.cpus_per_worker=4"])) == (False, {"CPU": 4}, 4)


def test_worker_slots_count_fractions_as_ray_does_and_two_ranks_never_share_a_gpu():
    from ray_resnet.config import load_config
    from ray_resnet.errors import ConfigError
    from ray_resnet.raytrain.cluster import plan_resources, worker_slots

    assert 1.0 // 0.1 == 9.0  # float arithmetic; Ray's fixed-point resources place 10
    assert worker_slots({"GPU": 0.1}, [{"GPU": 1.0}]) == 10
    assert worker_slots({"CPU": 1, "GPU": 0.25}, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]) == 6
    assert worker_slots({"GPU": 0.3}, [{"GPU": 1.0}]) == 3
    nodes = [{"CPU": 8.0}, {"CPU": 2.0}, {"CPU": 0.0}]
    assert [worker_slots({"CPU": 2}, nodes, placement) for placement in ("PACK", "SPREAD", "STRICT_SPREAD",
                                                                         "STRICT_PACK")] == [5, 5, 2, 4]
    with pytest.raises(ConfigError, match="run.gpus_per_worker=0.5 with run.num_workers=2 could put two ranks of "
                                          "this run on one GPU, which NCCL refuses"):
        plan_resources(load_config(None, ["run.num_workers=2", "run.autoscaling=true", "run.gpus_per_worker=0.5"]))
    with pytest.raises(ConfigError, match="run.num_workers=\\[1, 2\\]"):  # elastic: up to 2 ranks
        plan_resources(load_config(None, ["run.num_workers=[1,2]", "run.autoscaling=true", "run.gpus_per_worker=0.5"]))
    # One worker per run on a quarter GPU (sweep trials), and fractions on CPU-only runs, are fine.
    assert plan_resources(load_config(None, ["run.autoscaling=true", "run.gpus_per_worker=0.25"]))[1] == {
        "CPU": 1, "GPU": 0.25}
    assert plan_resources(load_config(None, ["run.num_workers=2", "run.autoscaling=true", "run.device=cpu",
                                             "run.gpus_per_worker=0.5"]))[0] is False


def test_the_runtime_env_shares_settings_and_endpoints_but_never_secrets(monkeypatch):
    from ray_resnet.raytrain.cluster import shared_environment

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ens5")
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    shared = shared_environment()["env_vars"]
    assert shared["AWS_ENDPOINT_URL"] == "http://minio.internal:9000" and shared["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert "AWS_SECRET_ACCESS_KEY" not in shared and "AWS_ACCESS_KEY_ID" not in shared
    assert shared["NCCL_SOCKET_IFNAME"] == "ens5" and shared["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    assert not [k for k in shared if k.startswith("CUDA_")]  # Ray sets each worker's CUDA_VISIBLE_DEVICES
    # In a submitted job, keys its own runtime env sets are left to it (Ray refuses a key set twice).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://other:9000"}}}))
    assert "AWS_ENDPOINT_URL" not in shared_environment()["env_vars"]


# A driver joins a Ray cluster that was started before NCCL_* was set (as `ray start` on a cluster's nodes), so
# its workers cannot have inherited it: only the runtime env brings it.
NCCL_ENV_RUN = """
import json, os, sys
import ray.train
from ray.cluster_utils import Cluster
from ray.train.torch import TorchTrainer
from ray_resnet.raytrain.cluster import connect, ray_settings

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
os.environ.update(NCCL_SOCKET_IFNAME="lo", NCCL_DEBUG="WARN", TORCH_NCCL_BLOCKING_WAIT="1", CUDA_LAUNCH_BLOCKING="1")
try:
    with ray_settings():
        connect(cluster.address)
        loop = lambda _: {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_", "CUDA_L"))}
        result = TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                              run_config=ray.train.RunConfig(name="env", storage_path=sys.argv[1])).fit()
    print("WORKER_ENV " + json.dumps(result.return_value))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_nccl_settings_where_a_run_starts_reach_its_train_workers(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith(("NCCL_", "CUDA_L"))},
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", NCCL_ENV_RUN, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WORKER_ENV ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    worker_env = json.loads(lines[-1].removeprefix("WORKER_ENV "))
    assert {k: worker_env.get(k) for k in ("NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "TORCH_NCCL_BLOCKING_WAIT")} == {
        "NCCL_SOCKET_IFNAME": "lo", "NCCL_DEBUG": "WARN", "TORCH_NCCL_BLOCKING_WAIT": "1"}
    assert "CUDA_LAUNCH_BLOCKING" not in worker_env  # CUDA_* is not forwarded
