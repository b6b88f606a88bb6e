#!/usr/bin/env bash
# Llama-3 70B full fine-tuning (recipes/llama3_70b_full.yaml): 4 nodes x 8 80 GB GPUs, TP4 PP4 VP5, DP2.
# Multi-node: one torchrun per node, rendezvous at the first node; checkpoints are large, keep runs on shared storage (NEMO_ADAPT_RUNS_DIR).
#   mkdir -p logs && sbatch launch/full_70b.sh [key=value ...]
#   NEMO_ADAPT_MODELS_DIR=/lustre/models NEMO_ADAPT_DATA_DIR=/lustre/data sbatch --nodes=N launch/full_70b.sh
# Container: NEMO_ADAPT_CONTAINER (default: the pinned NGC NeMo image; a .sqsh file or `none` for a venv).
# Every environment knob and the preemption behaviour: slurm/lib/nemo_adapt.sh and docs/launch.md.
#SBATCH --job-name=full-70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail
export NEMO_ADAPT_GPUS_PER_NODE=${NEMO_ADAPT_GPUS_PER_NODE:-8}
# shellcheck source=slurm/lib/nemo_adapt.sh
source "${NEMO_ADAPT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/nemo_adapt.sh"
na_train "${NEMO_ADAPT_RECIPE:-recipes/llama3_70b_full.yaml}" "$@"
