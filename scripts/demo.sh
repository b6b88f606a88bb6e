#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct, on this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Fine-tune the embedded SmolLM2-135M-Instruct with LoRA on the triage task, then evaluate the test
# split for the adapted model and the prompt-only baseline. Extra key=value overrides pass through.
exec .venv/bin/nemo-adapt run recipes/smollm2_135m_lora.yaml "$@"
