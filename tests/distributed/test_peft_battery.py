"""The shared PEFT battery: every row of `peft_cases.PEFT_CASES` at TP1, TP2, PP2, TP2xPP2 and PP2xVP2
(interleaved pipeline: two model chunks per rank) on CPU/gloo.

One torchrun launch per layout runs all rows (see `peft_battery_worker.py`), so adding a method costs
seconds, not launches. Launches run in order and each resumes the previous layout's checkpoints:

    TP1 -> TP2 (resumes TP1's)  -> PP2 (resumes TP2's) -> TP2xPP2 (resumes PP2's) -> PP2xVP2 (resumes TP2xPP2's)

Checked per row, at every layout: the 3 training losses equal TP1's within 1e-4; a step-2
adapter-only checkpoint saved at one layout and loaded at the next gives step 3's loss within 1e-4
(and a fresh adapter does not); `adapters_disabled` gives the base model's logits before and after
training, and zero-initialised methods start at the base; training moved the model; mergeable
methods give the same logits merged (1e-5) and the base logits again after unmerge (1e-5);
collapsible methods give the same logits collapsed (1e-5) and drop to the saved parameter count;
greedy generation with the KV cache equals greedy decoding by full forwards and a cached decode
step's logits equal a full forward's (1e-5); the adapter artifact holds the same tensors at every
layout; trainable counts equal the planner's closed form, per rank and in total; the HF PEFT export is the
same at every layout, and the exports of the adapters trained at TP1 and TP2xPP2, loaded by `PeftModel`, give the
trained model's logits (1e-4) and greedy tokens.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.distributed.peft_battery_worker import NEW_TOKENS
from tests.distributed.peft_cases import PEFT_CASES, planner_args

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "peft_battery_worker.py"
# name: (tp, pp, vp, layout whose checkpoints it resumes)
LAYOUTS = {"tp1": (1, 1, None, None), "tp2": (2, 1, None, "tp1"), "pp2": (1, 2, None, "tp2"),
           "tp2pp2": (2, 2, None, "pp2"), "pp2vp2": (1, 2, 2, "tp2pp2")}
# Layouts whose trained models also record logits and greedy tokens for the HF PEFT export check.
EXPORT_CHECKED = ("tp1", "tp2pp2")
IDS = [c.id for c in PEFT_CASES]
TOL = 1e-4


def cases(**flags) -> list:
    """Rows whose flags have the given values (pytest params with the row id as test id)."""
    rows = [c for c in PEFT_CASES if all(getattr(c, k) == v for k, v in flags.items())]
    return [pytest.param(c, id=c.id) for c in rows]


@pytest.fixture(scope="module")
def battery(tmp_path_factory) -> dict[str, list[dict]]:
    """{layout: [per-rank results]} for all rows; fails with the worker's output if a launch fails."""
    import os

    from nemo_adapt.models.loader import open_source

    root = tmp_path_factory.mktemp("peft_battery")
    env = {"NEMO_ADAPT_CACHE": str(root / "cache")}
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
    for name, (tp, pp, vp, resume) in LAYOUTS.items():
        out = root / name
        out.mkdir()
        args = ["--tp", str(tp), "--pp", str(pp), "--out", str(out)] + (["--vp", str(vp)] if vp else [])
        if resume:
            args += ["--resume-from", str(root / resume)]
        if name in EXPORT_CHECKED:
            args.append("--export-check")
        torchrun(tp * pp, WORKER, *args, env=env, timeout=900)
        results[name] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        results[name][0]["_out"] = str(out)
        assert len(results[name]) == tp * pp
    return results


def _last_stage(ranks: list[dict], case: str, key: str) -> list:
    """Values of a per-rank logit comparison from the ranks that computed it (the last pipeline stage)."""
    values = [r[case][key] for r in ranks if r[case].get(key) is not None]
    assert values, f"{case}: no rank reported {key}"
    return values


@pytest.mark.parametrize("case", cases())
def test_losses_equal_at_every_layout(battery, case):
    ref = battery["tp1"][0][case.id]["losses"]
    assert len(ref) == 3
    for layout, ranks in battery.items():
        for r in ranks:
            got = r[case.id]["losses"]
            for step, (a, b) in enumerate(zip(got, ref), start=1):
                assert abs(a - b) <= TOL, f"{layout} step {step}: {a} vs TP1 {b}"


@pytest.mark.parametrize("case", cases())
def test_adapter_checkpoint_resumes_at_another_layout(battery, case):
    """Step-2 checkpoint saved at layout X, loaded at layout Y: Y's step 3 equals the straight run's."""
    straight = battery["tp1"][0][case.id]["losses"][2]
    for layout, (_, _, _, saved_at) in LAYOUTS.items():
        if saved_at is None:
            continue
        for r in battery[layout]:
            resumed = r[case.id]["resumed"]
            assert resumed["step"] == 3
            assert abs(resumed["loss"] - straight) <= TOL, (
                f"saved at {saved_at}, resumed at {layout}: step 3 loss {resumed['loss']} vs {straight}")
            # The loaded adapter matters: a fresh one misses the straight run's loss by several times the
            # tolerance (IA3 moves least in 2 steps: 5.8e-4), so the match above is no coincidence.
            assert abs(resumed["fresh_loss"] - straight) > 3 * TOL, f"{saved_at} -> {layout}: checkpoint had no effect"


@pytest.mark.parametrize("case", cases())
def test_disable_gives_the_base_and_training_moves_the_model(battery, case):
    for layout, ranks in battery.items():
        for key in ("disabled_vs_base_step0", "disabled_vs_base"):
            assert max(_last_stage(ranks, case.id, key)) <= 1e-5, f"{layout}: {key}"
        if case.starts_at_base:
            assert max(_last_stage(ranks, case.id, "step0_vs_base")) <= 1e-5, f"{layout}: step 0 is not the base"
        # Otherwise every comparison above would pass trivially.
        assert min(_last_stage(ranks, case.id, "trained_vs_base")) > 1e-3, f"{layout}: 3 steps changed nothing"


@pytest.mark.parametrize("case", cases(mergeable=True))
def test_merge_and_unmerge_at_every_layout(battery, case):
    for layout, ranks in battery.items():
        for key in ("merged_vs_adapted", "unmerged_vs_adapted", "unmerged_base_vs_base"):
            assert max(_last_stage(ranks, case.id, key)) <= 1e-5, f"{layout}: {key}"


@pytest.mark.parametrize("case", cases(collapsible=True))
def test_collapse_keeps_outputs(battery, case):
    for layout, ranks in battery.items():
        assert max(_last_stage(ranks, case.id, "collapsed_vs_trained")) <= 1e-5, layout
        for r in ranks:
            assert r[case.id]["generation_collapsed"]["cached"] == r[case.id]["generation"]["cached"], layout


@pytest.mark.parametrize("case", cases())
def test_generation_with_cache_equals_full_forwards(battery, case):
    ref = battery["tp1"][0][case.id]
    for layout, ranks in battery.items():
        for r in ranks:
            rec = r[case.id]
            assert rec["generation"]["cached"] == rec["generation"]["uncached"], layout
            assert all(len(g) == NEW_TOKENS for g in rec["generation"]["cached"]), layout
            # The base generates the same at every layout (no adapter, so no training noise either).
            assert rec["generation_disabled"] == ref["generation_disabled"], layout
        keys = ["decode_vs_full"] + (["decode_vs_full_collapsed"] if case.collapsible else [])
        for key in keys:
            assert max(_last_stage(ranks, case.id, key)) <= 1e-5, f"{layout}: {key}"


@pytest.mark.parametrize("case", cases())
def test_adapter_artifact_is_layout_independent(battery, case):
    from safetensors.torch import load_file

    root = Path(battery["tp1"][0]["_out"]).parent
    ref = load_file(str(root / "tp1" / case.id / "artifact" / "adapter_model.safetensors"))
    assert ref
    for layout in LAYOUTS:
        got = load_file(str(root / layout / case.id / "artifact" / "adapter_model.safetensors"))
        assert got.keys() == ref.keys(), f"{layout}: artifact tensor names differ"
        for key, tensor in ref.items():
            assert got[key].shape == tensor.shape, f"{layout}: {key} shape"
            delta = (got[key] - tensor).abs().max().item()
            assert delta <= TOL, f"{layout}: {key} differs by {delta}"


@pytest.mark.parametrize("case", cases())
def test_artifact_loads_into_a_fresh_model_at_every_layout(battery, case):
    for layout, ranks in battery.items():
        assert max(_last_stage(ranks, case.id, "loaded_vs_trained")) <= 1e-5, layout


@pytest.mark.parametrize("case", [c for c in cases() if c.values[0].peft["method"] != "adapter"])
def test_hf_peft_export_is_the_same_at_every_layout_and_peft_model_computes_ours(battery, case, monkeypatch):
    """The Hugging Face PEFT export of the adapter trained at each layout: the same files as TP1's, tensors
    within the artifacts' tolerance (the export is a function of the layout-independent artifact). The exports
    of the adapters trained at TP1 and TP2xPP2, loaded by `PeftModel`, give the trained model's logits on four
    prompts within 1e-4 and its 16 greedy tokens per prompt."""
    from safetensors.torch import load_file

    from nemo_adapt.artifacts.hf_peft import export_peft
    from nemo_adapt.models.loader import resolve_path
    from tests.distributed.peft_battery_worker import EXPORT_PROMPTS, EXPORT_TOKENS
    from tests.peft_reference import peft_logits_and_tokens

    root = Path(battery["tp1"][0]["_out"]).parent
    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(root / "cache"))
    base = str(resolve_path("random:tiny_llama"))
    exported = {}
    for layout in LAYOUTS:
        out = export_peft(root / layout / case.id / "artifact", root / layout / case.id / "hf_peft", base=base)
        exported[layout] = (sorted(p.name for p in out.iterdir()), load_file(str(out / "adapter_model.safetensors")))
    names, ref = exported["tp1"]
    for layout, (files, got) in exported.items():
        assert files == names and got.keys() == ref.keys(), layout
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= TOL, f"{layout}: {worst}"

    virtual = case.id.startswith(("prompt", "p_tuning", "prefix"))
    for layout in EXPORT_CHECKED:
        out = root / layout / case.id
        ours = load_file(str(out / "export_check.safetensors"))["logits"]
        our_tokens = json.loads((out / "export_check.json").read_text())
        theirs, their_tokens = peft_logits_and_tokens(base, out / "hf_peft", torch.tensor(EXPORT_PROMPTS),
                                                      EXPORT_TOKENS, use_generate=not virtual)
        worst = (theirs - ours).abs().max().item()
        assert worst <= TOL, f"{layout}: PeftModel's logits differ from the trained model's by {worst}"
        assert their_tokens == our_tokens, layout


@pytest.mark.parametrize("case", cases(mergeable=True))
def test_merged_export_is_layout_independent_and_equals_merge_and_unload(battery, case, monkeypatch):
    """The adapter folded into the base at each layout writes the same files; the TP2xPP2 one, loaded by
    transformers, gives our adapted model's logits and those of HF PEFT's `merge_and_unload()` of its export."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    from nemo_adapt.artifacts.hf_peft import export_peft
    from nemo_adapt.models.loader import resolve_path
    from tests.distributed.peft_battery_worker import PROMPTS

    root = Path(battery["tp1"][0]["_out"]).parent
    ref_dir = root / "tp1" / case.id / "merged"
    ref = load_file(str(ref_dir / "model.safetensors"))
    for layout in ("tp2", "pp2", "tp2pp2"):
        merged = root / layout / case.id / "merged"
        assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in ref_dir.iterdir()), layout
        got = load_file(str(merged / "model.safetensors"))
        assert got.keys() == ref.keys()
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= TOL, f"{layout}: merged weights differ from TP1's by {worst}"

    out = root / "tp2pp2" / case.id
    tokens = torch.tensor([PROMPTS[0] + PROMPTS[1]])
    ours = load_file(str(out / "adapted_logits.safetensors"))["logits"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = hf(tokens).logits
    assert (merged_logits - ours).abs().max() <= 1e-4
    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(root / "cache"))  # where the battery's random base lives
    base = resolve_path("random:tiny_llama")
    export_peft(out / "artifact", out / "peft", base=str(base))
    reference = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(out / "peft"))
    with torch.no_grad():
        unloaded = reference.merge_and_unload().eval()(tokens).logits
    assert (merged_logits - unloaded).abs().max() <= 1e-4


@pytest.mark.parametrize("case", cases())
def test_trainable_counts_match_planner(battery, case):
    """Per rank: the planner's per-rank estimate (sharded per layer x local layers + first-stage part +
    every-stage part, held once per model chunk); per model: the sum over the model-parallel group = the
    planner's total (replicated copies counted once); after
    collapse, the planner's saved (inference) count."""
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.planner.memory import peft_param_breakdown, peft_rank_params, peft_trainable_params

    method, args = planner_args(case)
    spec = get_model_spec("tiny_llama")
    breakdown = peft_param_breakdown(spec, method, **args)
    saved = peft_trainable_params(spec, method, training=False, **args)
    for layout, ranks in battery.items():
        per_layer, first, every = peft_rank_params(spec, LAYOUTS[layout][0], breakdown)
        for r in ranks:
            rec = r[case.id]
            expected = per_layer * rec["layers_local"] + (first if rec["first_stage"] else 0) + every * rec["chunks"]
            assert rec["trainable_rank"] == expected, f"{layout}: rank holds {rec['trainable_rank']}, planner {expected}"
            assert rec["trainable"] == breakdown.training_total, f"{layout}"
            if case.collapsible:
                assert rec["trainable_collapsed"] == saved, f"{layout}"
                assert saved < breakdown.training_total
