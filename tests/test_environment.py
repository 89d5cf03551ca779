"""Where a run ran, without Ray: the facts environment.json records, gathered from real files and commands (fake
ones where the machine has none: a GPU, an ARM /proc/cpuinfo), and the file a resumed run appends to."""

import json
import os
import platform
import subprocess
import sys

import torch

from ray_resnet.io import environment
from ray_resnet.io.rundir import record_attempt, record_duration, record_worker_group

X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n"
# Two virtual machines' CPUs of one name: a Zen 4 EPYC with AVX-512 and bf16 dot products, and one without
EPYC_ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
XEON_AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4\n"


def test_cpu_model_reads_proc_cpuinfo_and_falls_back_to_platform(tmp_path):
    (tmp_path / "x86").write_text(X86)
    (tmp_path / "arm").write_text(ARM)
    assert environment.cpu_model(tmp_path / "x86") == "Intel(R) Xeon(R) Platinum 8480+"
    assert environment.cpu_model(tmp_path / "arm") == "BCM2835"
    assert environment.cpu_model(tmp_path / "absent") == (platform.processor() or platform.machine())


def test_cpus_of_one_name_are_told_apart_by_their_vector_and_matrix_units(tmp_path):
    for name, text in (("zen4", EPYC_ZEN4), ("avx2", EPYC_AVX2), ("amx", XEON_AMX)):
        (tmp_path / name).write_text(text)
    assert environment.cpu_model(tmp_path / "zen4") == "AMD EPYC (AVX2, AVX-512, AVX512-BF16)"
    assert environment.cpu_model(tmp_path / "avx2") == "AMD EPYC (AVX2)"
    assert environment.cpu_model(tmp_path / "amx") == "Intel(R) Xeon(R) Platinum 8480+ (AVX2, AVX-512, AVX512-BF16, AMX-BF16)"


def _git(root, *args):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_names_the_checkouts_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "ray_resnet").mkdir(parents=True)
    (checkout / "ray_resnet" / "train.py").write_text("v1\n")
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v1")
    commit = _git(checkout, "rev-parse", "HEAD")
    assert environment.git_state(checkout) == {"commit": commit, "dirty": False}
    (checkout / "notes.txt").write_text("untracked\n")
    assert environment.git_state(checkout)["dirty"] is False
    (checkout / "ray_resnet" / "train.py").write_text("v2\n")
    assert environment.git_state(checkout) == {"commit": commit, "dirty": True}

    assert environment.git_state(checkout / "ray_resnet") is None  # installed inside another repository
    assert environment.git_state(tmp_path) is None  # no repository at all
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert environment.git_state(checkout) is None  # no git


def test_node_gpus_lists_what_nvidia_smi_names_and_nothing_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert environment.node_gpus() == []
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!{sys.executable}\nprint('NVIDIA H100 80GB HBM3\\nNVIDIA H100 80GB HBM3')\n")
    smi.chmod(0o755)
    assert environment.node_gpus() == ["NVIDIA H100 80GB HBM3"] * 2
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert environment.node_gpus() == []


def test_an_attempt_records_versions_command_and_this_machine():
    record = environment.attempt(["ray-resnet", "train", "--num-workers", "2"], 2)
    assert record["command"] == ["ray-resnet", "train", "--num-workers", "2"] and record["num_workers"] == 2
    assert record["torch"] == torch.__version__ and record["python"] == platform.python_version()
    assert record["ray"] == __import__("importlib").metadata.version("ray")
    assert record["ray_resnet"] == __import__("importlib").metadata.version("ray-resnet")
    assert record["driver"]["cpus"] == os.cpu_count() and record["driver"]["cpu"] == environment.cpu_model()
    assert record["worker_groups"] == []


def test_a_resumed_run_appends_its_attempt_and_each_worker_group_goes_to_the_latest(tmp_path):
    rank = environment.worker(0, "node-a", torch.device("cpu"), "bf16")
    assert rank["gpu"] is None and rank["threads"] == torch.get_num_threads() and rank["device"] == "cpu"
    assert rank["precision"] == "bf16"
    record_attempt(str(tmp_path), environment.attempt(["first"], 2))
    record_worker_group(str(tmp_path), environment.worker_group([rank, {**rank, "rank": 1}]))
    record_attempt(str(tmp_path), environment.attempt(["resume"], [1, 2]))
    record_worker_group(str(tmp_path), environment.worker_group([rank]))  # an elastic run shrank ...
    record_worker_group(str(tmp_path), environment.worker_group([rank, {**rank, "rank": 1}]))  # ... and grew back
    attempts = json.loads((tmp_path / "environment.json").read_text())["attempts"]
    assert [a["command"] for a in attempts] == [["first"], ["resume"]]
    assert [[g["workers"] for g in a["worker_groups"]] for a in attempts] == [[2], [1, 2]]
    assert attempts[0]["worker_groups"][0]["ranks"][1]["rank"] == 1


def test_each_attempt_keeps_its_duration_and_a_resumed_group_is_compared_with_the_one_before(tmp_path):
    cpu = environment.worker(0, "node-a", torch.device("cpu"), "bf16")
    first = record_attempt(str(tmp_path), environment.attempt(["first"], 1))
    assert record_worker_group(str(tmp_path), environment.worker_group([cpu]), first) is None  # the first group
    assert record_duration(str(tmp_path), first, 100.04) == [100.0]
    second = record_attempt(str(tmp_path), environment.attempt(["resume"], 2))
    assert record_duration(str(tmp_path), first, 130.0) == [130.0, 0.0]  # the first attempt's workers went on
    fp32 = [{**cpu, "precision": "fp32"}, {**cpu, "rank": 1, "precision": "fp32"}]
    before = record_worker_group(str(tmp_path), environment.worker_group(fp32), second)
    assert before["ranks"] == [cpu]  # the group that wrote the checkpoint, from the attempt before
    assert environment.group_change(before, environment.worker_group(fp32)) == "workers 1 -> 2, precision bf16 -> fp32"
    gpu = [{**r, "device": f"cuda:{r['rank']}"} for r in fp32]
    assert environment.group_change(environment.worker_group(fp32), environment.worker_group(gpu)) == "device cpu -> cuda"
    assert environment.group_change(environment.worker_group(gpu), environment.worker_group(gpu)) is None
    assert record_duration(str(tmp_path), second, 20.0) == [130.0, 20.0]
    attempts = json.loads((tmp_path / "environment.json").read_text())["attempts"]
    assert [len(a["worker_groups"]) for a in attempts] == [1, 1] and attempts[1]["duration_s"] == 20.0
