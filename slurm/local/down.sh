#!/usr/bin/env bash
# Stop the cluster slurm/local/up.sh started in DIR: cancel its jobs, then end exactly the
# daemons whose PIDs up.sh recorded (SIGTERM, then SIGKILL after 10 s). Nothing else is touched.
#   slurm/local/down.sh DIR
set -uo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
pids=$dir/pids
[[ -f $pids ]] || { echo "down.sh: no $pids; nothing to stop" >&2; exit 0; }
export SLURM_CONF=$dir/slurm.conf

# Jobs first, so their steps (slurmstepd, children of nothing we track) end while slurmd still runs.
if [[ -f $SLURM_CONF ]] && scontrol ping >/dev/null 2>&1; then
  scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 60); do
    [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
    sleep 0.5
  done
fi

# Only a PID that still runs the program recorded for it (a PID can be reused after exit).
alive() { [[ -r /proc/$1/comm ]] && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2"* ]]; }
# slurmd and slurmctld before munged: they authenticate through it while shutting down.
for name in slurmd slurmctld munged; do
  while read -r prog pid; do
    [[ $prog == "$name" ]] && alive "$pid" "$prog" && kill -TERM "$pid" 2>/dev/null
  done < "$pids"
  for _ in $(seq 100); do
    left=0
    while read -r prog pid; do
      [[ $prog == "$name" ]] && alive "$pid" "$prog" && left=1
    done < "$pids"
    [[ $left == 0 ]] && break
    sleep 0.1
  done
  while read -r prog pid; do
    [[ $prog == "$name" ]] && alive "$pid" "$prog" && kill -KILL "$pid" 2>/dev/null
  done < "$pids"
done
mv "$pids" "$pids.stopped"
echo "slurm down: $dir" >&2
