#!/usr/bin/env bash
# Train on one machine: torchrun with one process per GPU (or MAMBATRON_NPROC_PER_NODE processes on CPU).
#   launch/local.sh --config configs/tiny.yaml --set train.max_steps=100
#   MAMBATRON_NPROC_PER_NODE=2 launch/local.sh --config configs/tiny.yaml     # 2 CPU processes (gloo)
# Arguments go to `python -m mambatron.train`; `--dry-run` prints the memory plan.
set -euo pipefail
ROOT=${MAMBATRON_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT"
PY=${MAMBATRON_PYTHON:-$([ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || echo python3)}
GPUS=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
NPROC=${MAMBATRON_NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}
export MAMBATRON_NPROC_PER_NODE=$NPROC PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-$(id -un)}
for arg in "$@"; do [ "$arg" = --dry-run ] && exec "$PY" -m mambatron.train "$@"; done
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m mambatron.train "$@"
