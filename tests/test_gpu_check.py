"""The GPU check (bench/gpu_check.sh) runs end to end on the CPU with tiny sizes, so it works when a GPU comes."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.mark.ray
def test_gpu_check_runs_on_cpu_with_tiny_sizes(real_cifar_small, tmp_path):
    output = tmp_path / "GPU_RESULTS.md"
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--models", "resnet8", "--modes", "eager",
         "--steps", "2", "--warmup", "1", "--accuracy-epochs", "1", "--tiny", "--trials", "2",
         "--share-images", "256", "--share-epochs", "1", "--data", str(real_cifar_small), "--output", str(output)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    # (compiling is left out here: minutes on 2 cores; tests/test_perf.py checks the compiled step)
    assert [line.split("|")[1:4] for line in report.splitlines() if line.startswith("| resnet8 |")] == [
        [" resnet8 ", " fp32 ", " eager "], [" resnet8 ", " bf16 ", " eager "]]
    assert "Short run: resnet20, 1 epochs" in report and "test accuracy" in report
    shared = [line.split("|") for line in report.splitlines() if line.startswith("| 2 |")]
    assert len(shared) == 1 and shared[0][2].strip() == "2"  # both trials at once
    assert float(shared[0][3].replace(",", "")) > 0
    assert "Not run" not in report
