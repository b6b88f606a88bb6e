"""Inference cost through `nemo-adapt eval --latency`: every variant measured (as evaluated, the base, merged for
methods that fold), prompt tuning's longer context counted, and bad arguments refused."""

import json

import pytest

from nemo_adapt.cli import main

pytestmark = pytest.mark.megatron


@pytest.mark.parametrize("peft", [{"method": "lora", "rank": 4, "alpha": 8},
                                  {"method": "prompt_tuning", "num_virtual_tokens": 6, "init": "random"}],
                         ids=["lora", "prompt_tuning"])
def test_latency_variants(tiny_run_dir, tmp_path, capsys, peft):
    from nemo_adapt.models.loader import resolve_path
    from tests.unit.test_hf_peft_export_virtual import _trained_artifact

    _trained_artifact(resolve_path("random:tiny_llama"), tmp_path / "adapter", peft)
    # 16 tokens: enough decode time that the timer separates it from the first token on a loaded machine.
    assert main(["eval", str(tiny_run_dir), "--adapter", str(tmp_path / "adapter"), "--latency", "16"]) == 0
    out = capsys.readouterr().out
    written = json.loads(next(tiny_run_dir.glob("eval_*adapter-*.json")).read_text())
    costs = written["inference_cost"]
    assert set(costs) == ({"as_evaluated", "base", "merged"} if peft["method"] == "lora" else {"as_evaluated", "base"})
    for c in costs.values():
        assert c["ttft_s"] > 0 and set(c["decode_tokens_per_s"]) == {"1", "8"} and c["new_tokens"] == 16
        assert all(r > 0 for r in c["decode_tokens_per_s"].values())
        assert c["peak_memory_bytes"] > 0 and c["memory_kind"] in ("process_peak_rss", "cuda_max_allocated")
    extra = peft.get("num_virtual_tokens", 0)
    assert costs["as_evaluated"]["context_tokens"] == costs["base"]["context_tokens"] + extra
    assert "inference (as_evaluated): first token" in out and "inference (base)" in out


def test_measure_refuses_what_it_cannot_time(tiny_run_dir, capsys):
    assert main(["eval", str(tiny_run_dir), "--latency", "1"]) == 2
    assert "--latency 1: the decode rate needs at least 2 generated tokens" in capsys.readouterr().err
    from nemo_adapt.eval.inference_cost import measure

    with pytest.raises(ValueError, match="new_tokens=1: the decode rate needs at least 2"):
        measure(None, None, [[1]], new_tokens=1)
    with pytest.raises(ValueError, match="2 prompts for batch sizes up to 8"):
        measure(None, None, [[1], [2]], batch_sizes=(1, 8))
