#!/usr/bin/env bash
# One task per node (srun --ntasks-per-node=1): run the given torchrun command with this node's rank.
#   bash slurm/lib/node.sh PYTHON -m torch.distributed.run ARGS...
# torchrun has no SIGUSR1 handler (the signal would kill it and orphan the ranks): ignore it here and
# in torchrun; the ranks install their own handler and checkpoint on it. SIGTERM stays as it is:
# torchrun passes it to the ranks and gives them 30 s to stop.
set -euo pipefail
trap '' USR1
python=$1; shift
[[ $1 == -m && $2 == torch.distributed.run ]] || { echo "node.sh: expected PYTHON -m torch.distributed.run ..." >&2; exit 2; }
shift 2
# Ranks get this long to finish their checkpoint after torchrun forwards SIGTERM (Slurm KillWait bounds it).
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-300}
exec "$python" -m torch.distributed.run --node-rank="${SLURM_NODEID:?not in a Slurm step}" "$@"
