#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py, bench/README.md): about 8 minutes on one GPU; the report goes to --output.
#   bash bench/gpu_check.sh --output "$OUT/gpu_check.md"
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
PYTHONUNBUFFERED=1 exec "$python" -m bench.gpu_check "$@"
