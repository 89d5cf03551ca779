"""The figure users trust: one run through six seeded faults (a 503 window, a dropped-connections window, a killed
worker, a killed driver, a killed node, another 503 window) on a simulated two-node cluster with its run dir and
data in a real S3 endpoint on 127.0.0.1, reached through a proxy that injects the store's faults (tests/chaos.py).
It must end finished as if nothing happened: every epoch and step once in TensorBoard, at most one epoch trained
again per fault, best/ equal to the best state of the checkpoint it came from."""

import re
from pathlib import Path

import pytest
import torch
from test_faults import STEPS_PER_EPOCH, reported_epochs, tb_steps

from ray_resnet.core.checkpoint import load_checkpoint
from ray_resnet.io import storage

from chaos import EPOCHS, FAULTS, RECOVERY_LIMIT_S
from cluster_scenarios import run_script
from s3_server import BUCKET

pytestmark = pytest.mark.ray
SEED = 20261206


def restarts(epochs_printed: list[int]) -> list[int]:
    """For each time training went back (a restart from a checkpoint), how many finished epochs it trains again."""
    return [before - after + 1 for before, after in zip(epochs_printed, epochs_printed[1:]) if after <= before]


def test_a_run_through_six_seeded_faults_ends_as_if_nothing_happened(s3_env, real_cifar_small):
    data, runs = f"s3://{BUCKET}/chaos-data", f"s3://{BUCKET}/chaos-runs"
    storage.upload_dir(real_cifar_small, data)
    out, _ = run_script(str(Path(__file__).with_name("chaos.py")), [str(SEED), data, runs], env=s3_env.env)
    run_dir = f"{runs}/chaos"

    assert out["returncode"] == 0, out["logs"][-1][-4000:]
    assert [f["kind"] for f in out["faults"]] and sorted(f["kind"] for f in out["faults"]) == sorted(FAULTS)
    assert len(out["logs"]) == 2  # the killed driver's command was rerun once
    result = storage.read_json(f"{run_dir}/result.json")
    assert result["status"] == "finished" and result["epoch"] == EPOCHS
    assert tb_steps(run_dir) == list(range(1, EPOCHS + 1))  # every epoch once, across every attempt's event files
    assert tb_steps(run_dir, "test/acc") == list(range(1, EPOCHS + 1))
    assert tb_steps(run_dir, "step/train_loss", "tb/steps") == list(range(2, EPOCHS * STEPS_PER_EPOCH + 1, 2))

    printed = [e for log in out["logs"] for e in reported_epochs(log)]
    redone = restarts(printed)
    assert all(0 <= n <= 1 for n in redone), (printed, redone)  # at most one finished epoch trained again ...
    assert len(redone) <= len(FAULTS)  # ... per fault
    assert sorted(set(printed)) == list(range(1, EPOCHS + 1))
    for fault in out["faults"]:
        assert fault["after_epoch"] < EPOCHS and fault["recovery_s"] < RECOVERY_LIMIT_S  # each met a training run
    assert out["requests_spoiled"]["503"] > 0 and out["requests_spoiled"]["drop"] > 0  # the windows met requests

    best, final = load_checkpoint(f"{run_dir}/best"), load_checkpoint(result["checkpoint"])
    assert best.epoch == final.best_epoch == result["best_epoch"]  # best/ came from the checkpoint's best state
    assert all(torch.equal(best.model[k], v) for k, v in final.best.model.items())
    retried = sum(len(re.findall(r"\[FailurePolicy\] RETRY", log)) for log in out["logs"])
    print(f"\n[chaos] seed {SEED}: {len(out['faults'])} faults, requests spoiled {out['requests_spoiled']} of "
          f"{sum(out['requests_spoiled'].values()) + out['requests_forwarded']}; worker-group restarts {retried}; "
          f"epochs trained {len(printed)} for {EPOCHS} (redone per restart: {redone})")
    for fault in out["faults"]:
        print(f"[chaos] {fault['kind']:>6} after epoch {fault['after_epoch']:>2} ({fault['detail']}): next checkpoint "
              f"{fault['recovery_s']} s later")
