#!/usr/bin/env bash
# Bring up a real Slurm cluster on this one machine (for tests and trying launch scripts):
# munged + slurmctld + one slurmd per node, all started here, in the foreground of their own
# session, with their PIDs written to DIR/pids so slurm/local/down.sh stops exactly these.
#
#   slurm/local/up.sh DIR [--nodes N] [--cpus C]
#   export SLURM_CONF=DIR/slurm.conf    # then sbatch/squeue/scontrol talk to this cluster
#   slurm/local/down.sh DIR
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (scripts/setup.sh installs them
# when missing). Nodes are named nanode1..N; they resolve to 127.0.0.1 through /etc/hosts (a line
# is added when missing). Each node declares C CPUs whatever the machine has (config_overrides).
# DIR must be new or empty; it holds the config, the munge key and socket, state, spool and logs.
set -euo pipefail

usage() { echo "usage: $0 DIR [--nodes N] [--cpus C]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
dir=$1; shift
nodes=2; cpus=4
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) nodes=${2:?}; shift 2 ;;
    --cpus) cpus=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
[[ $nodes =~ ^[1-9][0-9]*$ && $nodes -le 8 ]] || { echo "up.sh: --nodes=$nodes must be 1..8" >&2; exit 2; }
[[ $cpus =~ ^[1-9][0-9]*$ ]] || { echo "up.sh: --cpus=$cpus must be a positive integer" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "up.sh: must run as root (slurmd runs jobs as any user)" >&2; exit 1; }
for exe in munged slurmctld slurmd sbatch scontrol sinfo setpriv; do
  command -v "$exe" >/dev/null || { echo "up.sh: $exe is not installed; run scripts/setup.sh (apt: slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ -n $(ls -A "$dir") ]]; then echo "up.sh: $dir is not empty (a cluster may be running there)" >&2; exit 1; fi
# munged runs as the munge user: it must be able to reach its directory.
chmod 755 "$dir"
pids=$dir/pids
: > "$pids"
# On any failure, stop what was started so far.
here=$(cd "$(dirname "$0")" && pwd)
cleanup() {
  local rc=$?
  [[ $rc == 0 ]] || "$here/down.sh" "$dir" >/dev/null 2>&1
  exit "$rc"
}
trap cleanup EXIT

# Node names must resolve for slurmd -N; every node is this machine.
names=()
for i in $(seq 1 "$nodes"); do names+=("nanode$i"); done
missing=()
for n in "${names[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "127.0.0.1 ${missing[*]}" >> /etc/hosts
fi

# Free TCP ports for slurmctld and each slurmd (the kernel picks; nothing is fixed).
read -r -a ports < <(python3 - "$((nodes + 1))" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
ctld_port=${ports[0]}

mkdir -p "$dir/munge/key" "$dir/state" "$dir/log" "$dir/spool"
key=$dir/munge/key/munge.key
mungekey --create --keyfile="$key" --force >/dev/null 2>&1 \
  || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
chown -R munge:munge "$dir/munge"
# munged wants its socket directory searchable by all and its key readable only by itself.
chmod 755 "$dir/munge"
chmod 700 "$dir/munge/key"
chmod 400 "$key"
socket=$dir/munge/munge.socket.2

node_lines=""
for i in $(seq 1 "$nodes"); do
  node_lines+="NodeName=nanode$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=$cpus RealMemory=4000 State=UNKNOWN"$'\n'
done
cat > "$dir/slurm.conf" <<CONF
# Written by slurm/local/up.sh: a cluster of $nodes nodes, all on this machine.
ClusterName=nalocal
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job can start again after seconds, not the default two minutes.
AuthInfo=socket=$socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# No cgroups in containers: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled or preempted: time to checkpoint.
KillWait=30
# Finished jobs stay visible to scontrol this long (there is no slurmdbd, so no sacct).
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=300
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
echo "export SLURM_CONF=$SLURM_CONF" > "$dir/env"

# Each daemon runs in the foreground in its own session (setsid execs in place, so $! is the daemon).
setsid setpriv --reuid=munge --regid=munge --init-groups munged -F --socket="$socket" \
  --key-file="$key" --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
  --seed-file="$dir/munge/munged.seed" </dev/null >"$dir/log/munged.out" 2>&1 &
echo "munged $!" >> "$pids"
for _ in $(seq 50); do [[ -S $socket ]] && break; sleep 0.1; done
[[ -S $socket ]] || { echo "up.sh: munged did not start:" >&2; cat "$dir/munge/munged.log" >&2; exit 1; }

setsid slurmctld -D -i </dev/null >"$dir/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >> "$pids"
for n in "${names[@]}"; do
  setsid slurmd -D -N "$n" </dev/null >"$dir/log/slurmd-$n.out" 2>&1 &
  echo "slurmd $!" >> "$pids"
done

# Ready when every node is idle.
for _ in $(seq 150); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  [[ $idle -ge $nodes ]] && break
  sleep 0.2
done
if [[ ${idle:-0} -lt $nodes ]]; then
  echo "up.sh: only ${idle:-0} of $nodes nodes came up idle; logs in $dir/log" >&2
  sinfo -N >&2 || true
  exit 1
fi
echo "slurm up: $nodes nodes x $cpus CPUs; export SLURM_CONF=$SLURM_CONF" >&2
