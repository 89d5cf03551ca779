"""What GPU nodes need, checked without a GPU or a cloud: the cluster configs' images, drivers and GPU types against
the torch these tests run with, the node setup script (driver check, installs only what is missing), the shipped
sweeps packing 4 trials onto a 4-vCPU GPU node, and each fractional-GPU trial's memory cap (on a GPU: marked gpu).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import torchvision
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ray_resnet.config import load_config, replace
from ray_resnet.core.gpushare import cap_gpu_memory
from ray_resnet.raytrain.cluster import plan_resources, worker_slots
from ray_resnet.raytrain.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "cluster" / "setup_node.sh"
CLOUD_YAMLS = [REPO / "cluster" / f"{name}.yaml" for name in ("aws", "gcp")]
SWEEPS = sorted((REPO / "configs").glob("sweep_*.yaml"))

# Compute capability of the GPU in each instance family / accelerator type the configs may name (NVIDIA's tables).
GPU_CAPABILITY = {"g4dn": 7.5, "g5": 8.6, "g6": 8.9, "g6e": 8.9, "p3": 7.0, "p4d": 8.0, "p5": 9.0,
                  "nvidia-tesla-t4": 7.5, "nvidia-l4": 8.9, "nvidia-tesla-v100": 7.0, "nvidia-tesla-a100": 8.0,
                  "nvidia-a100-80gb": 8.0, "nvidia-h100-80gb": 9.0}
# The oldest Linux driver each CUDA release runs on (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER_FOR_CUDA = {"12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}


def _cluster(path: Path) -> dict:
    cfg = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cfg)
    return cfg


def _setup_settings() -> dict[str, str]:
    """The NAME=value lines at the top of cluster/setup_node.sh."""
    return dict(re.findall(r"^([A-Z_]+)=(\S+)", SETUP.read_text(), re.MULTILINE))


def _gpu_node_types(cfg: dict) -> dict[str, dict]:
    return {name: t for name, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def _gpu_capability(node_config: dict) -> float:
    """The compute capability of a node type's GPU; KeyError for a GPU this file does not know yet."""
    accelerators = node_config.get("guestAccelerators")
    if accelerators:
        return GPU_CAPABILITY[accelerators[0]["acceleratorType"]]
    return GPU_CAPABILITY[node_config["InstanceType"].split(".")[0]]


def _oldest_capability_torch_runs_on() -> float:
    arches = torch._C._cuda_getArchFlags().split()  # e.g. "sm_75 sm_80 ...": kernels built into this torch
    return min(int(a.removeprefix("sm_")) for a in arches if a.startswith("sm_")) / 10


# The CUDA build of torch these tests run with: what the cluster's nodes install is checked against it.
needs_cuda_build = pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch: no CUDA build to check")


def test_nodes_install_the_versions_the_tests_ran_with():
    settings = _setup_settings()
    assert [settings[k].split("+")[0] for k in ("TORCH", "TORCHVISION", "RAY")] == [
        v.split("+")[0] for v in (torch.__version__, torchvision.__version__, ray.__version__)]


@needs_cuda_build
def test_nodes_install_this_cuda_build_and_check_its_driver():
    settings = _setup_settings()
    assert (settings["TORCH"], settings["TORCHVISION"]) == (torch.__version__, torchvision.__version__)
    cuda = torch.version.cuda  # "13.0": the wheel index must serve this build, and the driver must run it
    assert settings["TORCH_INDEX"].endswith("/cu" + cuda.replace(".", ""))
    assert int(settings["MIN_DRIVER"]) >= MIN_DRIVER_FOR_CUDA[cuda]


@needs_cuda_build
@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=lambda p: p.name)
def test_gpu_nodes_have_a_gpu_and_a_driver_this_torch_runs_on(path):
    cfg = _cluster(path)
    gpu_types = _gpu_node_types(cfg)
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types.values())
    oldest = _oldest_capability_torch_runs_on()
    assert oldest == 7.5  # torch 2.14 cu130: Turing and newer, so no V100 (7.0)
    for t in gpu_types.values():
        assert _gpu_capability(t["node_config"]) >= oldest
        assert t["resources"]["CPU"] == 4 and t["resources"]["GPU"] == 1  # the shape the sweeps pack for
    # Every node runs setup_node.sh; on GPU workers with --gpu (a node without a driver is refused).
    assert cfg["head_setup_commands"][0] == "bash ~/ray-resnet/cluster/setup_node.sh"
    assert cfg["worker_setup_commands"][0].split("#")[0].split() == ["bash", "~/ray-resnet/cluster/setup_node.sh",
                                                                      "--gpu"]
    min_driver = int(_setup_settings()["MIN_DRIVER"])
    for t in cfg["available_node_types"].values():
        node = t["node_config"]
        if cfg["provider"]["type"] == "gcp":  # Deep Learning VM families name their driver: ...-nvidia-580
            family = node["disks"][0]["initializeParams"]["sourceImage"].rsplit("/family/", 1)[1]
            assert int(re.fullmatch(r".*-nvidia-(\d+)", family)[1]) >= min_driver
        else:  # AWS names no driver in an AMI id: a placeholder for the base AMI, whose driver setup_node.sh checks
            assert node["ImageId"] == "ami-<DLAMI_BASE_OSS_NVIDIA_DRIVER_GPU_UBUNTU_22_04>"


@needs_cuda_build
def test_the_gpu_check_refuses_volta_nodes():
    """The check above can fail: a V100 node type (p3, nvidia-tesla-v100) is below what this torch runs on."""
    oldest = _oldest_capability_torch_runs_on()
    assert _gpu_capability({"InstanceType": "p3.2xlarge"}) < oldest
    assert _gpu_capability({"guestAccelerators": [{"acceleratorType": "nvidia-tesla-v100"}]}) < oldest
    with pytest.raises(KeyError):  # an unknown GPU must be looked up and added, not passed
        _gpu_capability({"InstanceType": "x9.large"})


def _fake_node(tmp_path: Path, driver: str | None, python: str) -> tuple[dict, Path]:
    """A HOME, a venv whose python is `python` and whose pip only records its arguments, and an nvidia-smi
    reporting `driver` (None: no nvidia-smi). Returns the environment for setup_node.sh and pip's record."""
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    record = tmp_path / "pip-calls.txt"
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {python} "$@"\n')
    (venv_bin / "pip").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    if driver:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho \"{driver}\"\n")
    for script in [*bin_dir.iterdir(), *venv_bin.iterdir()]:
        script.chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_RESNET_VENV": str(tmp_path / "venv"),
           "RAY_RESNET_REPO": str(REPO), "PYTHONPATH": str(REPO)}
    return env, record


def _setup(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("driver, gpu_flag, message", [
    ("570.172.08", "", "NVIDIA driver 570.172.08 is older than 580, which torch 2.14.1"),
    (None, "--gpu", "no nvidia-smi on this GPU node"),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", "", "cannot reach an NVIDIA"),
])
def test_node_setup_refuses_a_driver_too_old_for_torch_before_installing(tmp_path, driver, gpu_flag, message):
    env, pip_calls = _fake_node(tmp_path, driver, sys.executable)
    done = _setup(env, *filter(None, [gpu_flag]))
    assert done.returncode == 1 and message in done.stderr
    assert not pip_calls.exists()  # nothing downloaded for a node that cannot run it


@pytest.mark.skipif(_setup_settings()["TORCH"] != torch.__version__, reason="this environment is not the pinned stack")
def test_node_setup_installs_nothing_where_the_venv_has_the_stack(tmp_path):
    env, pip_calls = _fake_node(tmp_path, "580.65.06", sys.executable)  # this environment: the tested versions
    done = _setup(env, "--gpu")
    assert done.returncode == 0, done.stderr
    assert "NVIDIA driver 580.65.06 (>= 580)" in done.stdout and "already installed" in done.stdout
    assert not pip_calls.exists()
    assert f"export PATH={tmp_path}/venv/bin:$PATH" in (tmp_path / ".bashrc").read_text()
    assert _setup(env, "--gpu").returncode == 0 and (tmp_path / ".bashrc").read_text().count("export PATH") == 1


def test_node_setup_installs_the_pinned_cuda_wheels_where_they_are_missing(tmp_path):
    env, pip_calls = _fake_node(tmp_path, None, f"{sys.executable} -S")  # no site-packages: a bare Python
    env["RAY_RESNET_REPO"] = str(tmp_path / "ray-resnet")
    done = _setup(env)
    assert done.returncode == 0, done.stderr
    settings = _setup_settings()
    assert pip_calls.read_text().splitlines() == [
        "install -q -U pip",
        f"install -q torch=={settings['TORCH']} torchvision=={settings['TORCHVISION']} --index-url "
        f"{settings['TORCH_INDEX']}",
        f"install -q ray[default,train,tune]=={settings['RAY']}",
        f"install -q -e {tmp_path / 'ray-resnet'}"]


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_pack_four_trials_on_each_gpu_node_of_the_cluster_configs(sweep_file):
    nodes = [t["resources"] for path in CLOUD_YAMLS for t in _gpu_node_types(_cluster(path)).values()]
    for cfg in load_sweep(sweep_file).configs:
        on_gpus = replace(cfg, run={"autoscaling": True})  # as on the AWS/GCP configs: GPU workers from 0
        bundle = plan_resources(on_gpus).bundle
        assert bundle == {"CPU": 1, "GPU": 0.25}
        assert [worker_slots(bundle, [node]) for node in nodes] == [4] * len(nodes)


def test_the_memory_cap_is_for_gpu_shares_only():
    cpu = torch.device("cpu")
    assert cap_gpu_memory(0.25, cpu) is None and cap_gpu_memory(1.0, cpu) is None
    for bad in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="set run.gpus_per_worker to e.g. 0.25"):
            cap_gpu_memory(bad, cpu)
    assert load_config(None, ["run.gpus_per_worker=0.25"]).run.gpus_per_worker == 0.25


@pytest.mark.gpu
def test_a_quarter_gpu_trial_cannot_allocate_past_its_quarter():
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    assert cap_gpu_memory(0.25, device) == 0.25
    assert torch.cuda.get_per_process_memory_fraction(device) == 0.25
    within = torch.empty(int(total * 0.15), dtype=torch.uint8, device=device)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(total * 0.15), dtype=torch.uint8, device=device)  # 30 % in all
    del within
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert cap_gpu_memory(1.0, device) is None and torch.cuda.get_per_process_memory_fraction(device) == 1.0


# A worker hook that writes the fraction its process runs under; the run on a 1-GPU Ray of its own (the session's
# Ray, if one runs, has no GPU).
QUARTER_GPU_RUN = """
import sys, ray, torch
from ray_resnet.config import load_config
from ray_resnet.core.loop import Hooks
from ray_resnet.raytrain.driver import run_training

class RecordFraction(Hooks):
    def epoch_end(self, metrics):
        fraction = torch.cuda.get_per_process_memory_fraction(torch.cuda.current_device())
        open(sys.argv[2], "w").write(str(fraction))

ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
run_training(load_config(None, ["model=resnet20", "schedule.epochs=1", "data.train_subset=256",
    "data.test_subset=200", "run.gpus_per_worker=0.25", "run.device=cuda", "run.name=quarter",
    f"data.root={sys.argv[1]}", f"run.storage={sys.argv[3]}"]), worker_hooks=lambda: [RecordFraction()])
"""


@pytest.mark.gpu
@pytest.mark.ray
def test_each_fractional_gpu_trial_worker_runs_under_its_cap(real_cifar_small, tmp_path):
    """A real run with run.gpus_per_worker=0.25: its worker applied the config's fraction."""
    seen = tmp_path / "fraction.txt"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", QUARTER_GPU_RUN, str(real_cifar_small), str(seen), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(seen.read_text()) == 0.25 and (tmp_path / "quarter" / "result.json").is_file()
