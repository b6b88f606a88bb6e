"""The cluster path on CPU through `nemo-adapt run` under torchrun (gloo): the interleaved (virtual)
pipeline and bf16 mixed precision run the same Megatron-Core code as on GPUs.

- PP2 x VP2 (two model chunks per rank, Megatron's interleaved 1F1B) gives PP1's per-step losses;
  its checkpoint resumes at PP2 without VP and at PP1; evaluation after a VP run generates what PP1
  generates; full fine-tuning with the distributed optimizer too.
- `train.precision=bf16` on CPU: bf16 weights in Float16Module, fp32 main parameters; tracks fp32 and
  resumes exactly.
"""

import json

import pytest

from tests.conftest import run_tiny as _run
from tests.conftest import train_losses

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def _close(a: dict[int, float], b: dict[int, float], tol: float, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: steps {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert abs(a[step] - b[step]) <= tol, f"{what} step {step}: {a[step]} vs {b[step]} (tolerance {tol})"


VP = {"pipeline": 2, "virtual_pipeline": 2}


def test_lora_interleaved_pipeline_matches_pp1_resumes_at_other_layouts_and_evaluates(tmp_path, tiny_data,
                                                                                     cache_env):
    """PP2 x VP2: 5 LoRA steps equal PP1 (1e-4); a VP checkpoint at step 3 resumes at PP2 and at PP1 with
    PP1's steps 4-5 (1e-4); the adapter and greedy test predictions after the VP run equal PP1's."""
    evaluate = {"enabled": True, "max_examples": 8, "max_new_tokens": 8, "baseline": False}
    ref_dir, _ = _run(tmp_path, "pp1", tiny_data, cache_env, eval=evaluate)
    ref = train_losses(ref_dir)
    assert ref[5] < ref[1], "training did not reduce the loss"

    vp_dir, _ = _run(tmp_path, "vp", tiny_data, cache_env, 2, parallel=VP, eval=evaluate)
    _close(train_losses(vp_dir), ref, 1e-4, "PP2xVP2 vs PP1")
    ran = json.loads((vp_dir / "results.json").read_text())
    assert ran["layout"]["virtual_pipeline"] == 2 and ran["megatron"]["model_chunks"] == 2
    ref_pred = [json.loads(line)["prediction"] for line in (ref_dir / "predictions_adapted.jsonl").open()]
    vp_pred = [json.loads(line)["prediction"] for line in (vp_dir / "predictions_adapted.jsonl").open()]
    assert len(vp_pred) == 8 and vp_pred == ref_pred

    from safetensors.torch import load_file

    a = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(vp_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4

    # Stop a VP run at step 3 with a checkpoint, then resume it at PP2 (no VP) and at PP1.
    for name, nproc, parallel in (("to_pp2", 2, {"pipeline": 2}), ("to_pp1", 1, {})):
        run_dir, _ = _run(tmp_path, name, tiny_data, cache_env, 2, parallel=VP, run={"max_steps": 3},
                          checkpoint={"save_interval": 3})
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
        _run(tmp_path, name, tiny_data, cache_env, nproc, parallel={"pipeline": 1, "virtual_pipeline": None,
                                                                    **parallel})
        resumed = train_losses(run_dir)
        _close({s: resumed[s] for s in (4, 5)}, {s: ref[s] for s in (4, 5)}, 1e-4, f"VP checkpoint {name}")


def test_full_finetuning_interleaved_with_distributed_optimizer(tmp_path, tiny_data, cache_env):
    """Full fine-tuning with the distributed optimizer: PP2 x VP2 equals PP1 at DP2 (Adam state sharded
    over 2 ranks) within 1e-4 for 5 steps."""
    full = {"peft": {"method": "none"}, "optim": {"lr": 1e-3, "schedule": "constant"}}
    dp2, _ = _run(tmp_path, "dp2", tiny_data, cache_env, 2, parallel={"distributed_optimizer": True}, **full)
    vp, _ = _run(tmp_path, "vp_full", tiny_data, cache_env, 2, parallel={**VP, "distributed_optimizer": True},
                 **full)
    ref = train_losses(dp2)
    assert ref[5] < ref[1] - 0.1, "full fine-tuning did not reduce the loss"
    _close(train_losses(vp), ref, 1e-4, "full FT PP2xVP2 vs DP2")
    # The result, RUN_DIR/model: the interleaved stages' chunks written as one Hugging Face directory, the same
    # weights as the DP2 run's (and not the base's: training changed them).
    from safetensors.torch import load_file

    a = load_file(str(dp2 / "model" / "model.safetensors"))
    b = load_file(str(vp / "model" / "model.safetensors"))
    assert set(a) == set(b) and len(a) == 4 * 9 + 2  # 4 layers x 9 tensors, embeddings, final norm (tied head)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"PP2xVP2 model/ differs from DP2's by {worst}"


BF16_TOLERANCE = 0.05
"""bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%): on this ~5-nat loss, 20 steps of bf16
forward/backward track fp32 to a few hundredths; measured max difference 0.0106."""


def test_bf16_on_cpu_tracks_fp32_and_resumes_exactly(tmp_path, tiny_data, cache_env):
    """20 tiny LoRA steps in bf16 track fp32 within BF16_TOLERANCE (and are not fp32's numbers); 10
    steps straight vs stopped at 5 and resumed: steps 6-10 identical."""
    long = {"max_steps": 20}
    fp32, _ = _run(tmp_path, "fp32", tiny_data, cache_env, run=long, train={"precision": "fp32"})
    bf16, _ = _run(tmp_path, "bf16", tiny_data, cache_env, run=long, train={"precision": "bf16"})
    assert json.loads((bf16 / "results.json").read_text())["megatron"]["params_dtype"] == "bfloat16"
    assert json.loads((fp32 / "results.json").read_text())["megatron"]["params_dtype"] == "float32"
    a, b = train_losses(fp32), train_losses(bf16)
    print(f"bf16 vs fp32 over 20 steps: max |loss difference| {max(abs(a[s] - b[s]) for s in a):.4f}")
    _close(b, a, BF16_TOLERANCE, "bf16 vs fp32")
    assert a[20] < a[1] - 0.3 and b[20] < b[1] - 0.3, "training did not reduce the loss"
    assert any(abs(a[s] - b[s]) > 1e-6 for s in a), "bf16 losses equal fp32's: bf16 was not used"

    ten = {"max_steps": 10}
    straight, _ = _run(tmp_path, "bf16_straight", tiny_data, cache_env, run=ten, train={"precision": "bf16"},
                       checkpoint={"save_interval": 5})
    stopped, _ = _run(tmp_path, "bf16_resumed", tiny_data, cache_env, run={"max_steps": 5},
                      train={"precision": "bf16"}, checkpoint={"save_interval": 5})
    _run(tmp_path, "bf16_resumed", tiny_data, cache_env, run=ten, train={"precision": "bf16"},
         checkpoint={"save_interval": 5})
    expected, resumed = train_losses(straight), train_losses(stopped)
    for step in range(6, 11):
        assert resumed[step] == expected[step], f"bf16 resume step {step}: {resumed[step]} vs {expected[step]}"
