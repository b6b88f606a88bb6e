#!/usr/bin/env bash
# README's merge demo: two LoRA adapters of the embedded SmolLM2-135M-Instruct trained on two tasks
# (support triage, expense coding), merged into one model by task arithmetic, and scored on both tasks next
# to each adapter alone. About 25 minutes on a 2-core CPU. Runs that exist are reused (rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin=.venv/bin/nemo-adapt

# 1. One adapter per task (each run also scores its adapter and the prompt-only baseline on its test split).
$bin run recipes/smollm2_135m_lora.yaml
$bin run recipes/smollm2_135m_lora_expenses.yaml
triage=runs/smollm2_135m_lora_triage
expenses=runs/smollm2_135m_lora_expenses

# 2. Each adapter on the other task.
$bin eval "$triage" --adapter "$expenses/adapter"
$bin eval "$expenses" --adapter "$triage/adapter"

# 3. Two merges, each validated on both tasks (each task must keep 0.7 exact match; the prompt-only
#    baselines score 0.000 here, too low a bar): task arithmetic (base + both deltas) and TIES (each delta
#    trimmed to half its entries). A merge that fails is still written, marked failed_validation in its
#    merge_config.json, and `merge` exits 1; the demo says so and goes on.
mkdir -p runs/merge_demo
cat > runs/merge_demo/task_arithmetic.yaml <<EOF
merge_method: task_arithmetic
base_model: embedded:smollm2_135m
models: [{model: $triage/adapter}, {model: $expenses/adapter}]
parameters: {lambda: 1.0}
dtype: float32
out: runs/merge_demo/triage_expenses_task_arithmetic
EOF
cat > runs/merge_demo/ties.yaml <<EOF
merge_method: ties
base_model: embedded:smollm2_135m
models: [{model: $triage/adapter, density: 0.5}, {model: $expenses/adapter, density: 0.5}]
parameters: {lambda: 1.0}
dtype: float32
out: runs/merge_demo/triage_expenses_ties
EOF
for method in task_arithmetic ties; do
  $bin merge "runs/merge_demo/$method.yaml" --validate "$triage" --validate "$expenses" --min-exact-match 0.7 \
    || echo "merge_demo: the $method merge failed its validation (runs/merge_demo/triage_expenses_$method/merge_config.json)"
done
