"""The GPU check (bench/gpu_check.py) runs end to end as on the GPU machine, which has torch but neither Ray nor
MLflow: here on the CPU, with tiny sizes, with CUDA and Ray hidden from the check and from every process it starts."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def run_check(tmp_path: Path, *flags: str) -> str:
    """The check's report after a run with `flags`, where `import ray` and `import mlflow` fail."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text("import sys\n\nfor name in ('ray', 'mlflow'):\n"
                                           "    sys.modules[name] = None  # import fails, as on the GPU machine\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(REPO)]), "CUDA_VISIBLE_DEVICES": ""}
    output = tmp_path / "out" / "gpu_check.md"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--output", str(output), "--steps", "3",
                           "--warmup", "1", "--eval-images", "100", "--precisions", "fp32", "--share-model", "resnet8",
                           "--share-images", "512", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output.read_text()


def rows(report: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in report.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_gpu_check_runs_without_gpu_and_ray_and_reports_each_failure_in_its_row(tmp_path):
    report = run_check(tmp_path, "--models", "resnet8", "nosuchnet", "--modes", "eager", "cuda-graphs",
                       "--processes", "1", "2", "--window-s", "1")
    assert "No GPU: no CUDA device" in report and "finished in" in report
    (eager, graphs), (bad_eager, bad_graphs) = rows(report, "resnet8"), rows(report, "nosuchnet")
    # engine and model-only img/s, their ratio, time to the first step
    assert eager[2] == "eager" and eager[-1].startswith("ok") and all(float(c.replace(",", "")) > 0 for c in eager[3:7])
    assert graphs[-1] == bad_graphs[-1] == "n/a: no CUDA"
    assert bad_eager[-1].startswith("error: ConfigError: model: unknown model 'nosuchnet'")
    sharing = rows(report, "1") + rows(report, "2")
    assert [r[-1][:2] for r in sharing] == ["ok", "ok"] and all(float(r[1].replace(",", "")) > 0 for r in sharing)
    ray_steps = [line for line in report.splitlines() if "| short Ray Train run" in line or "| sweep path" in line]
    assert len(ray_steps) == 4 and all(line.endswith("| skipped: no Ray |") for line in ray_steps)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "unknown model 'nosuchnet'" in log  # the failing process's own output, for a look after the loan


def test_gpu_check_kills_a_measurement_at_its_limit_and_skips_what_the_budget_leaves_no_time_for(tmp_path):
    # the sharing row would time its process for 60 s: killed at 4 s; the second one then has < 10 s of the 12 s left
    report = run_check(tmp_path, "--models", "resnet8", "--modes", "cuda-graphs", "--processes", "1", "1",
                       "--window-s", "60", "--limit-s", "4", "--budget-s", "12")
    (killed, not_run) = rows(report, "1")
    assert killed[-1] == "timeout: killed after 4 s" and killed[1] == ""
    assert not_run[-1] == "not run: over the 12 s budget"
