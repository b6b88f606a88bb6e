#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct, on this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/nemo-adapt generate "What is the capital of France?" "$@"
