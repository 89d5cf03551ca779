"""The ray-resnet command's error paths: one line on stderr, exit status 2, nothing written or deleted."""

import re

import pytest
import torch

from ray_resnet.apps import cli

from fixtures import own_lines


def _error_line(capsys):
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("ray-resnet: error: ")
    return err[0]


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nowhere"), "--storage", str(tmp_path / "runs")]) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "nowhere") in line and "train.parquet" in line and "cifar-10-batches-py" in line
    assert "--download" in line
    assert not (tmp_path / "runs").exists()  # failed before creating anything


def test_bad_config_values_and_models(tmp_path, capsys):
    assert cli.main(["train", "--model", "resnet30", "--data", str(tmp_path)]) == 2
    assert "6n+2" in _error_line(capsys)
    assert cli.main(["train", "--model", "resnet18", "--data", str(tmp_path)]) == 2
    assert "resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202" in _error_line(capsys)
    assert cli.main(["train", "--set", "optim.momentun=0.9"]) == 2
    assert "unknown key 'optim.momentun'" in _error_line(capsys)


def test_eval_of_a_corrupt_checkpoint_is_a_clear_error_and_deletes_nothing(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint_x"
    ckpt.mkdir()
    torch.save({"model": {}}, ckpt / "checkpoint.pt")
    (ckpt / "checkpoint.pt").write_bytes((ckpt / "checkpoint.pt").read_bytes()[:100])  # truncated
    assert cli.main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert re.search(r"cannot read \S*checkpoint_x/checkpoint.pt", _error_line(capsys))
    assert (ckpt / "checkpoint.pt").stat().st_size == 100
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no checkpoint at" in _error_line(capsys)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


def test_the_final_line_gives_the_runs_time_over_all_attempts_and_this_ones():
    from ray_resnet.apps.cli import wall_time_text
    from ray_resnet.io.rundir import RunResult

    def result(**times):
        return RunResult.from_dict({"epoch": 182, "epochs": 182, **times})

    assert wall_time_text(result(wall_time_s=9621.4, last_attempt_s=168.1, attempts=2)) == \
        "2:40:21 over 2 attempts, this one 2:48"
    assert wall_time_text(result(wall_time_s=59.6, last_attempt_s=59.6, attempts=1)) == "1:00"
    assert wall_time_text(result(wall_time_s=3600.0)) == "1:00:00"  # a result.json from before attempts were counted
