#!/usr/bin/env bash
# LoRA rank sweep of the tiny CPU recipe as a job array: element i trains with the i-th rank in its
# own run directory (runs/sweep<array id>-rank<r>), W&B group sweep-<array id>.
#   mkdir -p logs && sbatch launch/tiny_cpu_rank_sweep.sh [key=value ...]
#   NEMO_ADAPT_SWEEP_RANKS="2 8" sbatch --array=0-1 launch/tiny_cpu_rank_sweep.sh
#SBATCH --job-name=nemo-adapt-tiny-sweep
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
set -euo pipefail
export NEMO_ADAPT_CONTAINER=${NEMO_ADAPT_CONTAINER:-none}
export NEMO_ADAPT_GPUS_PER_NODE=${NEMO_ADAPT_GPUS_PER_NODE:-1}
# shellcheck source=slurm/lib/nemo_adapt.sh
source "${NEMO_ADAPT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/nemo_adapt.sh"
na_sweep "${NEMO_ADAPT_RECIPE:-recipes/tiny_llama_lora_cpu.yaml}" peft.rank "${NEMO_ADAPT_SWEEP_RANKS:-2 4 8 16}" "$@"
