"""Virtual-token PEFT methods (prompt tuning, p-tuning, prefix tuning) on Megatron-Core, CPU over gloo.

One torchrun launch per layout runs every row of `VIRTUAL_CASES` (see `peft_virtual_worker.py`):
TP1, then TP2, PP2 and TP2xPP2, each also resuming the previous layout's adapter-only checkpoint
(TP1 -> TP2 -> PP2 -> TP2xPP2). Checked per row: 3-step losses equal TP1's within 1e-4; the resumed
step equals the straight run's within 1e-4 (and differs from a fresh adapter's); trainable counts
equal the planner's closed form at every layout (per rank and in total); adapters_disabled gives the base model; greedy
generation with the KV cache equals greedy decoding by full forwards, and a cached decode step's
logits equal a full forward's; collapse leaves outputs unchanged within 1e-5 and the count drops to
the saved form. Five torchrun launches; about 3 minutes on 2 idle CPU cores.
"""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import torchrun, train_losses, write_tiny_chat_data, write_tiny_recipe
from tests.distributed.peft_virtual_worker import NEW_TOKENS, VIRTUAL_CASES, planner_args

pytestmark = [pytest.mark.megatron, pytest.mark.slow]
WORKER = Path(__file__).with_name("peft_virtual_worker.py")
# (name, tp, pp); each layout after the first resumes the previous one's checkpoints.
LAYOUTS = [("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2), ("tp2pp2", 2, 2)]
TOL = 1e-4


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    """layout -> per-rank result dicts (case id -> record)."""
    root = tmp_path_factory.mktemp("peft_virtual")
    out, previous = {}, None
    for name, tp, pp in LAYOUTS:
        d = root / name
        d.mkdir()
        args = ["--tp", str(tp), "--pp", str(pp), "--out", str(d)]
        if previous is not None:
            args += ["--resume-from", str(previous)]
        torchrun(tp * pp, WORKER, *args)
        out[name] = [json.loads((d / f"rank{r}.json").read_text()) for r in range(tp * pp)]
        previous = d
    return out


def _on_last_stage(ranks: list[dict], case: str, key: str) -> list:
    """Values of `key` from the ranks that computed it (the last pipeline stage)."""
    values = [r[case][key] for r in ranks if r[case].get(key) is not None]
    assert values, f"{case}: no rank reported {key}"
    return values


@pytest.mark.parametrize("case", VIRTUAL_CASES, ids=lambda c: c.id)
def test_losses_match_across_layouts_and_training_moves(results, case):
    ref = results["tp1"][0][case.id]["losses"]
    assert len(ref) == 3
    for name, _, _ in LAYOUTS:
        for r in results[name]:
            got = r[case.id]["losses"]
            assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL, f"{name}: {got} vs {ref}"
    assert ref[2] < ref[0], f"training did not lower the loss: {ref}"


@pytest.mark.parametrize("case", VIRTUAL_CASES, ids=lambda c: c.id)
def test_checkpoint_resumes_at_another_layout(results, case):
    for (prev, _, _), (name, _, _) in zip(LAYOUTS, LAYOUTS[1:]):
        straight = results[prev][0][case.id]["losses"][2]
        for r in results[name]:
            res = r[case.id]["resumed"]
            assert res["step"] == 3
            assert abs(res["loss"] - straight) <= TOL, f"{prev} -> {name}: {res['loss']} vs {straight}"
            # The loaded adapter matters: a fresh one gives a clearly different loss on that batch.
            assert abs(res["fresh_loss"] - straight) > 1e-3, f"{prev} -> {name}: checkpoint had no effect"


@pytest.mark.parametrize("case", VIRTUAL_CASES, ids=lambda c: c.id)
def test_trainable_counts_equal_the_closed_form(results, case):
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.planner.memory import peft_param_breakdown, peft_rank_params, peft_trainable_params
    from tests.distributed.peft_cases import peft_config

    method, args = planner_args(peft_config(case))
    spec = get_model_spec("tiny_llama")
    training = peft_trainable_params(spec, method, **args)
    saved = peft_trainable_params(spec, method, training=False, **args)
    breakdown = peft_param_breakdown(spec, method, **args)
    for name, tp, _ in LAYOUTS:
        per_layer, first, every = peft_rank_params(spec, tp, breakdown)
        for r in results[name]:
            rec = r[case.id]
            assert rec["trainable"] == training, f"{name}"
            # What each rank holds: the planner's per-rank model of where the parameters live.
            expected = per_layer * rec["layers_local"] + (first if rec["first_stage"] else 0) + every
            assert rec["trainable_rank"] == expected, f"{name}: rank holds {rec['trainable_rank']}, planner {expected}"
            if case.extra.get("collapse"):
                assert r[case.id]["trainable_collapsed"] == saved, f"{name}"
                assert saved < training


@pytest.mark.parametrize("case", VIRTUAL_CASES, ids=lambda c: c.id)
def test_adapters_disabled_is_the_base_and_the_method_changes_outputs(results, case):
    for name, _, _ in LAYOUTS:
        ranks = results[name]
        for key in ("disabled_vs_base_step0", "disabled_vs_base"):
            assert max(_on_last_stage(ranks, case.id, key)) <= 1e-5, f"{name} {key}"
        assert min(_on_last_stage(ranks, case.id, "trained_vs_base")) > 1e-3, f"{name}: the method changed nothing"


@pytest.mark.parametrize("case", VIRTUAL_CASES, ids=lambda c: c.id)
def test_generation_with_cache_equals_full_forwards(results, case):
    for name, _, _ in LAYOUTS:
        ranks = results[name]
        for r in ranks:
            gen = r[case.id]["generation"]
            assert gen["cached"] == gen["uncached"], name
            for key in ("generation", "generation_disabled", "generation_collapsed"):
                if key in r[case.id]:
                    assert all(len(g) == NEW_TOKENS for g in r[case.id][key]["cached"]), f"{name} {key}"
            if case.extra.get("collapse"):  # collapsing changes nothing a greedy decoder can see
                assert r[case.id]["generation_collapsed"]["cached"] == gen["cached"], name
        # The base model generates the same at every layout (no adapter: no training noise).
        assert ranks[0][case.id]["generation_disabled"] == results["tp1"][0][case.id]["generation_disabled"], name
        keys = ["decode_vs_full"] + (["decode_vs_full_collapsed"] if case.extra.get("collapse") else [])
        for key in keys:
            assert max(_on_last_stage(ranks, case.id, key)) <= 1e-5, f"{name} {key}"


@pytest.mark.parametrize("case", [c for c in VIRTUAL_CASES if c.extra.get("collapse")], ids=lambda c: c.id)
def test_collapse_keeps_outputs(results, case):
    for name, _, _ in LAYOUTS:
        assert max(_on_last_stage(results[name], case.id, "collapsed_vs_trained")) <= 1e-5, name


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_chat_data(tmp_path_factory.mktemp("virtual_data"), rows=32)


def test_prompt_tuning_recipe_trains_evaluates_and_exports(tmp_path, tiny_data, tmp_path_factory):
    """`nemo-adapt run` end to end (one process; the layouts are covered above): packing refused before
    training, then preflight, text init
    through the tokenizer, training with packing off, adapter artifact, and evaluation by generation
    (adapted, and the base baseline with the virtual tokens switched off)."""
    peft = {"method": "prompt_tuning", "num_virtual_tokens": 4, "init": "text", "init_text": "Upper-case it"}
    env = {"NEMO_ADAPT_CACHE": str(tmp_path_factory.mktemp("cache"))}
    recipe = write_tiny_recipe(tmp_path, tiny_data, run={"max_steps": 3},
                               eval={"enabled": True, "max_new_tokens": 3, "max_examples": 2})
    data = yaml.safe_load(recipe.read_text())
    data["peft"] = peft  # the whole section, not merged with the LoRA defaults of write_tiny_recipe
    data["data"]["packing"] = peft["method"] == "prefix_tuning"  # virtual tokens need one example per row
    recipe.write_text(f"# tiny_llama {peft['method']} test recipe\n" + yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    # Packing with virtual tokens is refused before anything is built or written.
    bad = torchrun(1, "-m nemo_adapt.cli", "run", str(recipe), "data.packing=true", env=env, check=False)
    assert bad.returncode != 0 and "data.packing=false" in bad.stderr, bad.stderr[-2000:]
    assert not run_dir.exists()
    torchrun(1, "-m nemo_adapt.cli", "run", str(recipe), env=env)
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    results = json.loads((run_dir / "results.json").read_text())
    assert {"adapted", "baseline"} <= set(results["eval"])
    # Every test record's prediction is kept next to results.json, in test-file order.
    for label in ("adapted", "baseline"):
        rows = [json.loads(line) for line in (run_dir / f"predictions_{label}.jsonl").read_text().splitlines()]
        assert [r["line"] for r in rows] == [1, 2] and sum(r["correct"] for r in rows) == results["eval"][label]["correct"]
        assert "predictions" not in results["eval"][label]
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft"]["method"] == peft["method"] and cfg["num_parameters"] == results["trainable_params"]
