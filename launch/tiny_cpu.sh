#!/usr/bin/env bash
# Tiny Llama LoRA on CPUs (gloo): small clusters, trying the launch path, and the Slurm tests.
# No GPUs, no container: runs from the virtual environment scripts/setup.sh builds.
#   mkdir -p logs                                                  # data: datasets/tiny_upper (shipped)
#   sbatch launch/tiny_cpu.sh [key=value ...]                      # 2 nodes x 2 ranks
#   sbatch --nodes=1 launch/tiny_cpu.sh parallel.tensor=2          # 1 node, TP2
# Environment: NEMO_ADAPT_GPUS_PER_NODE (ranks per node, default 2), NEMO_ADAPT_RECIPE, and the
# knobs listed in slurm/lib/nemo_adapt.sh.
#SBATCH --job-name=nemo-adapt-tiny
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
set -euo pipefail
export NEMO_ADAPT_CONTAINER=${NEMO_ADAPT_CONTAINER:-none}
export NEMO_ADAPT_GPUS_PER_NODE=${NEMO_ADAPT_GPUS_PER_NODE:-2}
# shellcheck source=slurm/lib/nemo_adapt.sh
source "${NEMO_ADAPT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/nemo_adapt.sh"
na_train "${NEMO_ADAPT_RECIPE:-recipes/tiny_llama_lora_cpu.yaml}" "$@"
