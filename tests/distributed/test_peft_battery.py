"""The shared PEFT battery: every row of `peft_cases.PEFT_CASES` at TP1, TP2, PP2 and TP2xPP2 on CPU/gloo.

One torchrun launch per layout runs all rows (see `peft_battery_worker.py`), so adding a method costs
seconds, not launches. Launches run in order and each resumes the previous layout's checkpoints:

    TP1 -> TP2 (resumes TP1's)  -> PP2 (resumes TP2's) -> TP2xPP2 (resumes PP2's)

Checked per row: the 3 training losses equal TP1's within 1e-4 at every layout; a step-2 adapter-only
checkpoint saved at one layout and loaded at the next gives step 3's loss within 1e-4; step 0 and
`adapters_disabled` give the base model's logits; training moved the model; mergeable methods give
the same logits merged (1e-5) and the base logits again after unmerge (1e-5), at every layout; greedy
generation produces tokens and the same tokens at every layout; the adapter artifact holds the same
tensors at every layout; each rank's trainable-parameter count is the planner's per-rank estimate.
"""

import json
from pathlib import Path

import pytest

from tests.conftest import torchrun
from tests.distributed.peft_cases import PEFT_CASES

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "peft_battery_worker.py"
# name: (tp, pp, layout whose checkpoints it resumes)
LAYOUTS = {"tp1": (1, 1, None), "tp2": (2, 1, "tp1"), "pp2": (1, 2, "tp2"), "tp2pp2": (2, 2, "pp2")}
IDS = [c.id for c in PEFT_CASES]

MERGEABLE = [c.id for c in PEFT_CASES if c.mergeable]


@pytest.fixture(scope="module")
def battery(tmp_path_factory) -> dict[str, list[dict]]:
    """{layout: [per-rank results]} for all rows; fails with the worker's output if a launch fails."""
    from nemo_adapt.models.loader import open_source

    root = tmp_path_factory.mktemp("peft_battery")
    env = {"NEMO_ADAPT_CACHE": str(root / "cache")}
    import os

    old = os.environ.get("NEMO_ADAPT_CACHE")
    os.environ["NEMO_ADAPT_CACHE"] = env["NEMO_ADAPT_CACHE"]
    try:
        open_source("random:tiny_llama", "tiny_llama")  # write the random checkpoint once, before the ranks read it
    finally:
        if old is None:
            os.environ.pop("NEMO_ADAPT_CACHE")
        else:
            os.environ["NEMO_ADAPT_CACHE"] = old
    results = {}
    for name, (tp, pp, resume) in LAYOUTS.items():
        out = root / name
        out.mkdir()
        args = ["--tp", str(tp), "--pp", str(pp), "--out", str(out)]
        if resume:
            args += ["--resume-from", str(root / resume)]
        torchrun(tp * pp, WORKER, *args, env=env, timeout=900)
        results[name] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        results[name][0]["_out"] = str(out)
        assert len(results[name]) == tp * pp
    return results


def _worst(ranks: list[dict], case: str, key: str) -> float:
    """Largest value of a per-rank logit comparison (only last-stage ranks compute logits)."""
    values = [r[case][key] for r in ranks if r[case].get(key) is not None]
    assert values, f"no rank reported {key} for {case}"
    return max(values)


@pytest.mark.parametrize("case", IDS)
def test_losses_equal_at_every_layout(battery, case):
    ref = battery["tp1"][0][case]["losses"]
    assert len(ref) == 3
    for layout, ranks in battery.items():
        for r in ranks:
            got = r[case]["losses"]
            for step, (a, b) in enumerate(zip(got, ref), start=1):
                assert abs(a - b) <= 1e-4, f"{case} {layout} step {step}: {a} vs TP1 {b}"


@pytest.mark.parametrize("case", IDS)
def test_adapter_checkpoint_resumes_at_another_layout(battery, case):
    """Step-2 checkpoint saved at layout X, loaded at layout Y: Y's step 3 equals the straight run's."""
    straight = battery["tp1"][0][case]["losses"][2]
    for layout, (_, _, saved_at) in LAYOUTS.items():
        if saved_at is None:
            continue
        for r in battery[layout]:
            resumed = r[case]["resumed"]
            assert resumed["step"] == 3
            assert abs(resumed["loss"] - straight) <= 1e-4, (
                f"{case}: saved at {saved_at}, resumed at {layout}: step 3 loss {resumed['loss']} vs {straight}")


@pytest.mark.parametrize("case", IDS)
def test_starts_at_base_and_disable_restores_base(battery, case):
    for layout, ranks in battery.items():
        assert _worst(ranks, case, "step0_vs_base") <= 1e-5, f"{case} {layout}: step 0 differs from the base model"
        assert _worst(ranks, case, "disabled_vs_base") <= 1e-5, f"{case} {layout}: adapters_disabled is not the base"
        # Otherwise every comparison above would pass trivially.
        assert _worst(ranks, case, "trained_vs_base") > 1e-3, f"{case} {layout}: 3 steps did not change the model"


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_and_unmerge_at_every_layout(battery, case):
    for layout, ranks in battery.items():
        assert _worst(ranks, case, "merged_vs_adapted") <= 1e-5, f"{case} {layout}: merged != adapted"
        assert _worst(ranks, case, "unmerged_vs_adapted") <= 1e-5, f"{case} {layout}: unmerged != adapted"
        assert _worst(ranks, case, "unmerged_base_vs_base") <= 1e-5, f"{case} {layout}: unmerge did not restore base"


@pytest.mark.parametrize("case", [c.id for c in PEFT_CASES if c.generation])
def test_generation_runs_and_agrees_across_layouts(battery, case):
    ref = battery["tp1"][0][case]["generated"]
    assert len(ref) == 2 and all(0 < len(g) <= 4 for g in ref), ref  # 2 prompts, up to 4 new tokens (EOS stops)
    for layout, ranks in battery.items():
        for r in ranks:
            assert r[case]["generated"] == ref, f"{case} {layout}: generated {r[case]['generated']} vs TP1 {ref}"


@pytest.mark.parametrize("case", IDS)
def test_adapter_artifact_is_layout_independent(battery, case):
    from safetensors.torch import load_file

    root = Path(battery["tp1"][0]["_out"]).parent
    ref = load_file(str(root / "tp1" / case / "artifact" / "adapter_model.safetensors"))
    assert ref
    for layout in LAYOUTS:
        got = load_file(str(root / layout / case / "artifact" / "adapter_model.safetensors"))
        assert got.keys() == ref.keys(), f"{case} {layout}: artifact tensor names differ"
        for key, tensor in ref.items():
            assert got[key].shape == tensor.shape, f"{case} {layout}: {key} shape"
            delta = (got[key] - tensor).abs().max().item()
            assert delta <= 1e-4, f"{case} {layout}: {key} differs by {delta}"


@pytest.mark.parametrize("case", IDS)
def test_trainable_counts_match_planner_per_rank(battery, case):
    """Per rank: the planner's per-rank estimate (sharded per layer x local layers + first-stage part +
    every-stage part); per model: unique counts summed over ranks = the planner's total."""
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.planner.memory import (
        _PEFT_DEFAULTS,
        peft_param_breakdown,
        peft_rank_params,
    )

    row = next(c for c in PEFT_CASES if c.id == case)
    method = row.peft["method"]
    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in row.peft.items() if k in _PEFT_DEFAULTS[method]}
    spec = get_model_spec("tiny_llama")
    breakdown = peft_param_breakdown(spec, method, **args)
    for layout, ranks in battery.items():
        tp = LAYOUTS[layout][0]
        per_layer, first, every = peft_rank_params(spec, tp, breakdown)
        for r in ranks:
            rec = r[case]
            expected = per_layer * rec["layers_local"] + (first if rec["first_stage"] else 0) + every
            assert rec["trainable_rank"] == expected, f"{case} {layout}: rank holds {rec['trainable_rank']}"
        assert sum(r[case]["trainable_unique"] for r in ranks) == breakdown.training_total, f"{case} {layout}"
