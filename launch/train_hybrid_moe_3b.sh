#!/usr/bin/env bash
# configs/hybrid-moe-3b.yaml on 2 node(s) x 8 GPUs: a thin wrapper over launch/train.sh (same arguments, same environment).
#   sbatch launch/train_hybrid_moe_3b.sh [--set key=value ...] [--dry-run]; sbatch options (e.g. --nodes) override the lines below.
#SBATCH --job-name=hybrid-moe-3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=mambatron-%x-%j.log
ROOT=${MAMBATRON_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
exec bash "$ROOT/launch/train.sh" --config "$ROOT/configs/hybrid-moe-3b.yaml" "$@"
