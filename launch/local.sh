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

# torchrun exits 1 whenever a worker exits non-zero; rank 0 writes the run's own exit code (0 done, 75 preempted
# and saved, 2 bad input) to MAMBATRON_EXIT_FILE, and this script exits with that.
MAMBATRON_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/mambatron-exit.XXXXXX")
export MAMBATRON_EXIT_FILE
trap 'rm -f "$MAMBATRON_EXIT_FILE"' EXIT
# SIGTERM/SIGINT/SIGUSR1 sent to this script alone are forwarded to torchrun, which passes them to the training
# processes (they finish the step, save and exit 75). Sent to the whole process group, everyone already has them.
TORCHRUN=""
forward() { [ -n "$TORCHRUN" ] && kill -s "$1" "$TORCHRUN" 2>/dev/null; true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1
set +e
# torchrun itself would die of SIGUSR1: it ignores it, its training processes catch it.
bash -c 'trap "" USR1; exec "$@"' torchrun \
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m mambatron.train "$@" &
TORCHRUN=$!
# `wait` returns early whenever a trapped signal arrives: keep waiting until torchrun itself has exited.
while :; do
  wait "$TORCHRUN"; rc=$?
  kill -0 "$TORCHRUN" 2>/dev/null || break
done
code=$(head -n 1 "$MAMBATRON_EXIT_FILE" 2>/dev/null)
# Repeat rank 0's one-line error last, below torchrun's own failure report.
message=$(sed -n 2p "$MAMBATRON_EXIT_FILE" 2>/dev/null)
[ -n "$message" ] && echo "$message" >&2
case "$code" in
  0) exit "$rc" ;;  # rank 0 finished, but another process may not have
  [1-9]|[1-9][0-9]|[1-9][0-9][0-9]) exit "$code" ;;
  *) exit "$rc" ;;
esac
