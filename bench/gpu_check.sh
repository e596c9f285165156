#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one JSON object on stdout, progress on stderr.
#
#   bench/gpu_check.sh            on a CUDA machine, at most 8 minutes
#   bench/gpu_check.sh --short    CPU, tiny sizes, seconds (what the tests run)
#
# Set LEO_DATA_DIR (the folder holding omniglot/images_background_small{1,2}.zip) for the
# DAG section; PYTHON overrides the interpreter (default: the project's .venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$root"
# The script keeps to its own budget (420 s); this is the hard stop at 8 minutes.
exec timeout --kill-after=10 480 "$python" bench/gpu_check.py "$@"
