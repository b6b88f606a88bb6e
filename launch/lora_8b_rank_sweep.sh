#!/usr/bin/env bash
# Llama-3 8B LoRA rank sweep as a job array (recipes/llama3_8b_lora.yaml): one 8-GPU node per rank,
# each in its own run directory (runs/sweep<array id>-rank<r>), W&B group sweep-<array id>.
#   mkdir -p logs && sbatch launch/lora_8b_rank_sweep.sh [key=value ...]
#   NEMO_ADAPT_SWEEP_RANKS="8 64" sbatch --array=0-1 launch/lora_8b_rank_sweep.sh
#SBATCH --job-name=lora-8b-rank-sweep
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail
export NEMO_ADAPT_GPUS_PER_NODE=${NEMO_ADAPT_GPUS_PER_NODE:-8}
# shellcheck source=slurm/lib/nemo_adapt.sh
source "${NEMO_ADAPT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/nemo_adapt.sh"
na_sweep "${NEMO_ADAPT_RECIPE:-recipes/llama3_8b_lora.yaml}" peft.rank "${NEMO_ADAPT_SWEEP_RANKS:-8 16 32 64}" "$@"
