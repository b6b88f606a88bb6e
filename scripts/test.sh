#!/usr/bin/env bash
# Run the whole test suite on CPU: lint, every test on the pinned megatron-core, then the
# Megatron-facing tests again on megatron-core 0.19.2 (the release current NGC containers carry).
# Extra arguments go to pytest (e.g. scripts/test.sh -k parity). Set NEMO_ADAPT_SKIP_MCORE_MATRIX=1
# to skip the second megatron-core pass.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

scripts/setup.sh
.venv/bin/ruff check nemo_adapt tests bench
# Every shell script (launch/, slurm/, scripts/) and the Dockerfile, with the linters of the test extras.
mapfile -t shell_scripts < <(find launch slurm scripts -name '*.sh' | sort)
.venv/bin/shellcheck -x "${shell_scripts[@]}"
.venv/bin/hadolint containers/Dockerfile
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

if [[ "${NEMO_ADAPT_SKIP_MCORE_MATRIX:-0}" != 1 ]]; then
  NEMO_ADAPT_VENV=.venv-mcore019 NEMO_ADAPT_MCORE=0.19.2 scripts/setup.sh
  echo "== megatron-core $(.venv-mcore019/bin/python -c 'import megatron.core as m; print(m.__version__)' 2>/dev/null) =="
  .venv-mcore019/bin/python -m pytest -q -p no:cacheprovider -m megatron "$@"
fi
