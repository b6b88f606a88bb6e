#!/usr/bin/env bash
# Shared sbatch library: sourced by launch/*.sh and by scripts `nemo-adapt launch` renders.
#
#   source "$NEMO_ADAPT_HOME/slurm/lib/nemo_adapt.sh"
#   na_train RECIPE [key=value ...]
#
# What na_train does, in order:
#   1. checks its inputs in the first seconds (container image, virtual environment, recipe, data
#      paths, base checkpoint, resume checkpoint) -- one short step on one node, no weights loaded;
#   2. sets the rendezvous: first node of the allocation, a port derived from the job id;
#   3. runs one torchrun per node (srun --ntasks-per-node=1), static rendezvous, inside the
#      container through pyxis or on bare metal from a virtual environment;
#   4. on SIGUSR1 (--signal=B:USR1@secs, before the time limit) or SIGTERM (preemption, scancel)
#      asks every rank to checkpoint at the next step boundary (the trainer exits with 75), then
#      requeues the job (scontrol requeue); the requeued job resumes from that checkpoint and
#      continues the same W&B run (the run directory keeps its id).
#
# Environment knobs (all optional):
#   NEMO_ADAPT_HOME            repository checkout (default: $SLURM_SUBMIT_DIR)
#   NEMO_ADAPT_CONTAINER       image for pyxis (registry ref or .sqsh file); `none` = bare metal
#   NEMO_ADAPT_MOUNTS          extra container mounts, comma-separated src:dst[:flags]
#   NEMO_ADAPT_DATA_DIR        host directory mounted at /data in the container
#   NEMO_ADAPT_MODELS_DIR      host directory of base checkpoints, mounted at /checkpoints
#   NEMO_ADAPT_RUNS_DIR        where run directories go (run.output_dir=$NEMO_ADAPT_RUNS_DIR/<run name>)
#   NEMO_ADAPT_VENV            bare metal: virtual environment (default: $NEMO_ADAPT_HOME/.venv)
#   NEMO_ADAPT_GPUS_PER_NODE   ranks per node (GPUs; CPU ranks on CPU clusters)
#   NEMO_ADAPT_PORT            rendezvous port (default: 20000 + job id mod 20000, + restarts)
#   NEMO_ADAPT_DRY_RUN=1       print the commands instead of running them (no Slurm needed)
#   WANDB_API_KEY, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS   passed to the ranks
#     through the environment, never written into scripts or logs
#
# NCCL (GPU clusters; defaults suit InfiniBand clusters with NGC containers, change per site):
#   CUDA_DEVICE_MAX_CONNECTIONS=1        Megatron-Core's TP/SP communication overlap needs in-order kernels
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1    a hung or failed collective ends the job instead of hanging it
#   NCCL_DEBUG=WARN                      set INFO to see the rings/trees and the network NCCL picked
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA      set when NCCL picks the wrong interface (site-specific; unset here)

# The pinned NGC NeMo image (it carries PyTorch, Megatron-Core, Transformer Engine and apex).
NA_DEFAULT_CONTAINER=nvcr.io/nvidia/nemo:25.11
# Mount point of the repository inside the container.
NA_CONTAINER_WORKDIR=/workspace/nemo-adapt
# Exit status of a trainer that saved a checkpoint on a signal (nemo_adapt/training/signals.py).
NA_EXIT_REQUEUE=75

na_log() { printf '[nemo-adapt %s job %s] %s\n' "$(date -u +%H:%M:%S)" "${SLURM_JOB_ID:-?}" "$*"; }
na_die() { printf '[nemo-adapt %s job %s] error: %s\n' "$(date -u +%H:%M:%S)" "${SLURM_JOB_ID:-?}" "$*" >&2; exit 2; }

# Run a command, or print it (shell-quoted, one line) in dry-run mode.
na_exec() {
  if [[ ${NEMO_ADAPT_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
    return 0
  fi
  "$@"
}

# Hostnames of the allocation, one per line.
na_hostnames() {
  if [[ ${NEMO_ADAPT_DRY_RUN:-0} == 1 && -z ${SLURM_JOB_NODELIST:-} ]]; then
    local i
    for ((i = 1; i <= ${SLURM_JOB_NUM_NODES:-1}; i++)); do echo "node$i"; done
    return
  fi
  scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job (SLURM_JOB_NODELIST unset)}"
}

# Fill NA_* settings from the environment and the allocation; check them (fast, before any srun).
na_setup() {
  NA_HOME=${NEMO_ADAPT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
  [[ -f $NA_HOME/slurm/lib/nemo_adapt.sh ]] \
    || na_die "NEMO_ADAPT_HOME=$NA_HOME is not a nemo-adapt checkout (no slurm/lib/nemo_adapt.sh)"
  NA_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  NA_GPUS=${NEMO_ADAPT_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  [[ $NA_GPUS =~ ^[1-9][0-9]*$ ]] || na_die "NEMO_ADAPT_GPUS_PER_NODE=$NA_GPUS must be a positive integer"
  NA_CONTAINER=${NEMO_ADAPT_CONTAINER:-$NA_DEFAULT_CONTAINER}
  NA_MASTER_ADDR=$(na_hostnames | head -n 1)
  [[ -n $NA_MASTER_ADDR ]] || na_die "no hostnames in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
  # A port derived from the job id (unique among running jobs of a cluster); a requeued job moves to
  # the next 1000 so the previous attempt's socket in TIME_WAIT cannot block it.
  local jobid=${SLURM_JOB_ID:-0}
  NA_MASTER_PORT=${NEMO_ADAPT_PORT:-$((20000 + (jobid + 1000 * ${SLURM_RESTART_COUNT:-0}) % 20000))}

  # What each srun step runs in: the container (pyxis) or the host with a virtual environment.
  NA_SRUN_ENV=()
  if [[ $NA_CONTAINER == none ]]; then
    NA_VENV=${NEMO_ADAPT_VENV:-$NA_HOME/.venv}
    [[ -x $NA_VENV/bin/python ]] \
      || na_die "NEMO_ADAPT_CONTAINER=none runs on bare metal, but $NA_VENV/bin/python does not exist; run scripts/setup.sh or set NEMO_ADAPT_VENV"
    NA_PYTHON=$NA_VENV/bin/python
  else
    if [[ $NA_CONTAINER == /* || $NA_CONTAINER == ./* || $NA_CONTAINER == *.sqsh ]]; then
      [[ -r $NA_CONTAINER ]] \
        || na_die "container image NEMO_ADAPT_CONTAINER=$NA_CONTAINER does not exist or is not readable (build it: see containers/README.md)"
    fi
    if [[ ${NEMO_ADAPT_DRY_RUN:-0} != 1 ]] && ! srun --help 2>/dev/null | grep -q -- '--container-image'; then
      na_die "srun has no --container-image (pyxis is not installed on this cluster); set NEMO_ADAPT_CONTAINER=none to run from a virtual environment"
    fi
    local mounts="$NA_HOME:$NA_CONTAINER_WORKDIR"
    if [[ -n ${NEMO_ADAPT_DATA_DIR:-} ]]; then mounts+=",$NEMO_ADAPT_DATA_DIR:/data"; fi
    if [[ -n ${NEMO_ADAPT_MODELS_DIR:-} ]]; then mounts+=",$NEMO_ADAPT_MODELS_DIR:/checkpoints"; fi
    if [[ -n ${NEMO_ADAPT_RUNS_DIR:-} ]]; then mounts+=",$NEMO_ADAPT_RUNS_DIR:$NEMO_ADAPT_RUNS_DIR"; fi
    if [[ -n ${NEMO_ADAPT_MOUNTS:-} ]]; then mounts+=",$NEMO_ADAPT_MOUNTS"; fi
    NA_SRUN_ENV=(--container-image="$NA_CONTAINER" --container-mounts="$mounts"
                 --container-workdir="$NA_CONTAINER_WORKDIR" --no-container-mount-home)
    NA_PYTHON=python
  fi
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$NA_GPUS} / NA_GPUS > 0 ? ${SLURM_CPUS_ON_NODE:-$NA_GPUS} / NA_GPUS : 1 ))}
}

# Recipe overrides every launch adds: the run directory under NEMO_ADAPT_RUNS_DIR when set.
na_overrides() {
  NA_OVERRIDES=("$@")
  if [[ -n ${NEMO_ADAPT_RUNS_DIR:-} ]]; then
    # ${run.name} is a recipe interpolation, resolved by the recipe loader (with the overrides applied).
    # shellcheck disable=SC2016
    NA_OVERRIDES+=('run.output_dir='"$NEMO_ADAPT_RUNS_DIR"'/${run.name}')
  fi
}

# srun for one task per node of the whole allocation, in the container if there is one.
na_srun_nodes() {
  na_exec srun --nodes="$NA_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL \
    "${NA_SRUN_ENV[@]}" "$@"
}

# Check everything checkable in seconds, as the ranks will see it (same container, same paths):
# recipe, data files, base checkpoint (opened, not loaded), layout vs world size, resume checkpoint.
# Prints the run directory into NA_RUN_DIR.
na_preflight() {
  local recipe=$1; shift
  local out
  if [[ ${NEMO_ADAPT_DRY_RUN:-0} == 1 ]]; then
    na_exec srun --nodes=1 --ntasks=1 --export=ALL "${NA_SRUN_ENV[@]}" "$NA_PYTHON" -m nemo_adapt.launch.preflight \
      --world-size=$((NA_NODES * NA_GPUS)) "$recipe" "$@"
    NA_RUN_DIR=runs/DRY_RUN
    return
  fi
  if ! out=$(srun --nodes=1 --ntasks=1 --export=ALL "${NA_SRUN_ENV[@]}" "$NA_PYTHON" -m nemo_adapt.launch.preflight \
               --world-size=$((NA_NODES * NA_GPUS)) "$recipe" "$@"); then
    na_die "preflight failed for $recipe (message above); nothing was trained"
  fi
  NA_RUN_DIR=$(printf '%s\n' "$out" | sed -n 's/^run_dir=//p' | tail -n 1)
  [[ -n $NA_RUN_DIR ]] || na_die "preflight printed no run directory"
  # A path inside the container: on the host it is relative to the checkout when not absolute.
  if [[ $NA_RUN_DIR != /* ]]; then
    NA_RUN_DIR=$NA_HOME/$NA_RUN_DIR
  elif [[ $NA_CONTAINER != none && $NA_RUN_DIR == "$NA_CONTAINER_WORKDIR"/* ]]; then
    NA_RUN_DIR=$NA_HOME/${NA_RUN_DIR#"$NA_CONTAINER_WORKDIR"/}
  fi
}

# One element of a job-array sweep: element $SLURM_ARRAY_TASK_ID trains with the i-th value of KEY,
# in its own run directory ($NEMO_ADAPT_RUNS_DIR or runs/, then sweep<array job id>-<key><value>) and
# with the W&B group sweep-<array job id>.
#   na_sweep RECIPE KEY "V1 V2 ..." [key=value ...]      (sbatch --array=0-<number of values - 1>)
na_sweep() {
  local recipe=$1 key=$2 values=()
  read -r -a values <<< "$3"
  shift 3
  local n=${#values[@]}
  local i=${SLURM_ARRAY_TASK_ID:-}
  [[ -n $i ]] || na_die "na_sweep needs a job array: sbatch --array=0-$((n - 1)) ..."
  ((i < n)) || na_die "array index $i has no value: $key takes $n values (${values[*]}); use --array=0-$((n - 1))"
  local value=${values[$i]} sweep=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-0}}
  local name="sweep${sweep}-${key##*.}${value}"
  na_log "sweep element $i of $n: $key=$value, run $name"
  na_train "$recipe" "$@" "$key=$value" "run.name=$name" "run.output_dir=${NEMO_ADAPT_RUNS_DIR:-runs}/$name" \
    "logging.wandb_group=sweep-$sweep"
}

# Run `python ARGS...` as one task on the first node, in the container or the virtual environment
# (follow-up jobs of a chain: evaluation, merge, export).
na_python_step() {
  na_setup
  cd "$NA_HOME" || na_die "cannot cd to $NA_HOME"
  na_log "running: nemo-adapt ${*:3}"
  na_exec srun --nodes=1 --ntasks=1 --export=ALL "${NA_SRUN_ENV[@]}" "$NA_PYTHON" "$@"
}

# Forward a signal the batch shell got to every rank (all job steps; the batch shell is not one).
na_on_signal() {
  NA_SIGNALLED=$1
  na_log "received SIG$1: asking every rank to checkpoint at the next step and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$NA_SRUN_PID" 2>/dev/null || true
}

# The trainer's own verdict, if this attempt wrote one: exit_code from results.json (0 done, 75 stopped
# on a signal), or empty when the file is missing or older than this attempt.
na_trainer_exit() {
  local results=$NA_RUN_DIR/results.json
  [[ -f $results && $results -nt $NA_ATTEMPT_STAMP ]] || return 0
  sed -n 's/^ *"exit_code": *\([0-9]*\).*/\1/p' "$results" | head -n 1
}

# Train RECIPE with overrides on the whole allocation; requeue on a signal; exit with the job's status.
na_train() {
  local recipe=${1:?usage: na_train RECIPE [key=value ...]}; shift
  na_setup
  na_overrides "$@"
  cd "$NA_HOME" || na_die "cannot cd to $NA_HOME"
  na_log "recipe $recipe on $NA_NODES node(s) x $NA_GPUS rank(s); container ${NA_CONTAINER}; restart ${SLURM_RESTART_COUNT:-0}"
  na_preflight "$recipe" "${NA_OVERRIDES[@]}"
  na_log "checks passed; starting the ranks, rendezvous ${NA_MASTER_ADDR}:${NA_MASTER_PORT}"

  # One torchrun per node: static rendezvous at the first node; node rank = Slurm's node id.
  local torchrun=("$NA_PYTHON" -m torch.distributed.run --nnodes="$NA_NODES" --nproc-per-node="$NA_GPUS"
                  --rdzv-backend=static --master-addr="$NA_MASTER_ADDR" --master-port="$NA_MASTER_PORT"
                  -m nemo_adapt.cli run "$recipe" "${NA_OVERRIDES[@]}")
  if [[ ${NEMO_ADAPT_DRY_RUN:-0} == 1 ]]; then
    na_srun_nodes bash slurm/lib/node.sh "${torchrun[@]}"
    return 0
  fi

  NA_ATTEMPT_STAMP=$(mktemp "${TMPDIR:-/tmp}/nemo-adapt-attempt.XXXXXX")
  NA_SIGNALLED=""
  trap 'na_on_signal USR1' USR1
  trap 'na_on_signal TERM' TERM
  # node.sh sets --node-rank from SLURM_NODEID on each node.
  srun --nodes="$NA_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL "${NA_SRUN_ENV[@]}" \
    bash slurm/lib/node.sh "${torchrun[@]}" &
  NA_SRUN_PID=$!
  local rc
  # `wait` returns early when a trapped signal arrives; keep waiting until srun itself has ended.
  while true; do
    rc=0
    wait "$NA_SRUN_PID" || rc=$?
    kill -0 "$NA_SRUN_PID" 2>/dev/null || break
  done
  trap - USR1 TERM
  local trainer
  trainer=$(na_trainer_exit)
  rm -f "$NA_ATTEMPT_STAMP"
  na_log "training step ended: srun status $rc, trainer status ${trainer:-none}"
  if [[ $trainer == 0 && $rc == 0 ]]; then
    na_log "training finished; run directory $NA_RUN_DIR"
    return 0
  fi
  if [[ $trainer == "$NA_EXIT_REQUEUE" || -n $NA_SIGNALLED ]]; then
    if [[ $trainer == "$NA_EXIT_REQUEUE" ]]; then
      na_log "checkpoint written on a signal; requeueing job $SLURM_JOB_ID to resume from it"
    else
      na_log "signalled before the ranks could checkpoint; requeueing job $SLURM_JOB_ID (resumes from the last checkpoint)"
    fi
    scontrol requeue "$SLURM_JOB_ID" || na_die "scontrol requeue $SLURM_JOB_ID failed"
    return 0
  fi
  na_log "training failed (srun status $rc); see the rank output above"
  return "$((rc == 0 ? 1 : rc))"
}
