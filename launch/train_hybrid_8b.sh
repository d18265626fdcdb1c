#!/usr/bin/env bash
# configs/hybrid-8b.yaml on 8 node(s) x 8 GPUs: a thin wrapper over launch/train.sh (same arguments, same environment).
#   sbatch launch/train_hybrid_8b.sh [--set key=value ...] [--dry-run]; sbatch options (e.g. --nodes) override the lines below.
#SBATCH --job-name=hybrid-8b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=mambatron-%x-%j.log
ROOT=${MAMBATRON_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
exec bash "$ROOT/launch/train.sh" --config "$ROOT/configs/hybrid-8b.yaml" "$@"
