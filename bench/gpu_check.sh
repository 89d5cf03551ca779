#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one command, at most about 8 minutes on one GPU, writes bench/GPU_RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" -m bench.gpu_check "$@"
