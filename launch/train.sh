#!/usr/bin/env bash
# Generic SLURM launch of mambatron training: one srun task per node runs torchrun, which starts one training
# process per GPU. Arguments after the script go to `python -m mambatron.train`:
#
#   sbatch --nodes=4 launch/train.sh --config configs/mamba1-1.4b.yaml --set train.max_steps=20000
#   sbatch launch/train.sh --config configs/mamba1-7b.yaml --dry-run        # print the memory plan only
#
# sbatch options on the command line override the #SBATCH lines below. On a GPU-less (test) cluster:
#   MAMBATRON_NPROC_PER_NODE=2 sbatch --nodes=2 --gpus-per-node=0 launch/train.sh --config configs/tiny.yaml
# (training then runs on CPU with gloo; MAMBATRON_NPROC_PER_NODE sets the processes per node, default: the GPUs
# SLURM gave the node, or 1 without GPUs).
#
# Preemption: SLURM sends SIGUSR1 to this script 120 s before the time limit (--signal=B:USR1@120); it is forwarded
# to the training processes, which finish the current step, save a checkpoint, requeue the job and exit. The
# requeued job resumes from that checkpoint (--requeue; logs are appended: --open-mode=append).
#
# Environment: MAMBATRON_ROOT (repository, default: the submit directory), MAMBATRON_PYTHON (default: the
# repository's .venv if present, else python3), MAMBATRON_NPROC_PER_NODE, MAMBATRON_RDZV_PORT (default 29500 +
# job id mod 1000).
#SBATCH --job-name=mambatron
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=mambatron-%x-%j.log
set -uo pipefail

ROOT=${MAMBATRON_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
cd "$ROOT" || exit 1
if [ -n "${MAMBATRON_PYTHON:-}" ]; then PY=$MAMBATRON_PYTHON
elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi

JOB=${SLURM_JOB_ID:-local}
GPUS=${SLURM_GPUS_ON_NODE:-0}
export MAMBATRON_NPROC_PER_NODE=${MAMBATRON_NPROC_PER_NODE:-$([ "${GPUS:-0}" -gt 0 ] 2>/dev/null && echo "$GPUS" || echo 1)}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-$JOB}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

for arg in "$@"; do
  # The plan needs no processes on the nodes: print it once from here (world size = nodes x processes per node).
  if [ "$arg" = --dry-run ]; then exec "$PY" -m mambatron.train "$@"; fi
done

HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
HEAD=${HEAD:-localhost}
PORT=${MAMBATRON_RDZV_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
echo "[train.sh] job $JOB (restart ${SLURM_RESTART_COUNT:-0}) nodes ${SLURM_NNODES:-1} x ${MAMBATRON_NPROC_PER_NODE}" \
     "processes, rendezvous $HEAD:$PORT, $(date -u +%FT%TZ)"

# Forward USR1/TERM to the training processes (a signal that comes before srun has started is passed on after).
SRUN="" PENDING=""
forward() {
  echo "[train.sh] got SIG$1, forwarding to the training processes"
  if [ -n "$SRUN" ]; then kill -s "$1" "$SRUN" 2>/dev/null; else PENDING=$1; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# torchrun itself ignores SIGUSR1 (it would die of it); its training processes catch it and save.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'trap "" USR1; exec "$@"' torchrun \
  "$PY" -m torch.distributed.run --nnodes "${SLURM_NNODES:-1}" --nproc-per-node "$MAMBATRON_NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$JOB" --max-restarts 0 \
  -m mambatron.train "$@" &
SRUN=$!
if [ -n "$PENDING" ]; then forward "$PENDING"; fi
# `wait` returns early whenever a trapped signal arrives: keep waiting until srun itself has exited.
while :; do
  wait "$SRUN"; rc=$?
  kill -0 "$SRUN" 2>/dev/null || break
done
echo "[train.sh] training exited with $rc at $(date -u +%FT%TZ)"
exit "$rc"
