#!/usr/bin/env bash
# Llama-3 8B LoRA (recipes/llama3_8b_lora.yaml): 1 node x 8 80 GB GPUs, data parallel 8.
# Base weights under /checkpoints and data under /data inside the container.
#   mkdir -p logs && sbatch launch/lora_8b.sh [key=value ...]
#   NEMO_ADAPT_MODELS_DIR=/lustre/models NEMO_ADAPT_DATA_DIR=/lustre/data sbatch --nodes=N launch/lora_8b.sh
# Container: NEMO_ADAPT_CONTAINER (default: the pinned NGC NeMo image; a .sqsh file or `none` for a venv).
# Every environment knob and the preemption behaviour: slurm/lib/nemo_adapt.sh and docs/launch.md.
#SBATCH --job-name=lora-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail
export NEMO_ADAPT_GPUS_PER_NODE=${NEMO_ADAPT_GPUS_PER_NODE:-8}
# shellcheck source=slurm/lib/nemo_adapt.sh
source "${NEMO_ADAPT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/nemo_adapt.sh"
na_train "${NEMO_ADAPT_RECIPE:-recipes/llama3_8b_lora.yaml}" "$@"
