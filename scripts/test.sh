#!/usr/bin/env bash
# Run the whole test suite on CPU: lint, every test on the pinned megatron-core, then Megatron-facing
# tests again on megatron-core 0.19.2 (the release current NGC containers carry).
# The second pass runs the fast Megatron-facing tests (layers, merge, counts, configs) and the
# end-to-end ones that touch the APIs that change most between releases (model build parity at TP3xPP2, the
# layout that crosses both tensor and pipeline parallelism; dist_checkpointing save/resume, the distributed
# optimizer, the interleaved pipeline schedule); NEMO_ADAPT_MCORE_MATRIX=full runs every
# megatron-marked test there (about 15 more minutes on 2 cores), =skip skips the pass.
# Extra arguments go to pytest (e.g. scripts/test.sh -k parity).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

scripts/setup.sh
.venv/bin/ruff check nemo_adapt tests bench
# Every shell script (launch/, slurm/, scripts/) and the Dockerfile, with the linters of the test extras.
mapfile -t shell_scripts < <(find launch slurm scripts -name '*.sh' | sort)
.venv/bin/shellcheck -x "${shell_scripts[@]}"
.venv/bin/hadolint containers/Dockerfile
# Tests marked `exhaustive` repeat a check in an easier form than one CI already runs (SmolLM2 parity at TP3
# and PP2 beside TP3xPP2, ...; README lists them): NEMO_ADAPT_TESTS=full runs them too (about 10 more minutes).
tests=${NEMO_ADAPT_TESTS:-core}
[[ $tests == full || $tests == core ]] || { echo "NEMO_ADAPT_TESTS=$tests: expected full or core" >&2; exit 2; }
selection=()
[[ $tests == full ]] || selection=(-m "not exhaustive")
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "${selection[@]}" "$@"

matrix=${NEMO_ADAPT_MCORE_MATRIX:-core}
[[ $matrix == skip ]] && exit 0
[[ $matrix == full || $matrix == core ]] || { echo "NEMO_ADAPT_MCORE_MATRIX=$matrix: expected full, core or skip" >&2; exit 2; }
NEMO_ADAPT_VENV=.venv-mcore019 NEMO_ADAPT_MCORE=0.19.2 scripts/setup.sh
echo "== megatron-core $(.venv-mcore019/bin/python -c 'import megatron.core as m; print(m.__version__)' 2>/dev/null) =="
second=(.venv-mcore019/bin/python -m pytest -q -p no:cacheprovider --durations=15)
if [[ $matrix == full ]]; then
  "${second[@]}" -m megatron "$@"
else
  "${second[@]}" -m "megatron and not slow" "$@"
  "${second[@]}" "$@" \
    "tests/distributed/test_model_parity.py::test_smollm2_gguf_logits_and_greedy_match_transformers[tp3xpp2]" \
    tests/distributed/test_training.py::test_exact_resume_after_sigkill_and_interrupted_checkpoint \
    tests/distributed/test_training.py::test_full_finetuning_with_distributed_optimizer_matches_and_reshards \
    tests/distributed/test_interleaved_and_bf16.py::test_lora_interleaved_pipeline_matches_pp1_resumes_at_other_layouts_and_evaluates
fi
