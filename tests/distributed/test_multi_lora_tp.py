"""Mixed-adapter batches at TP2 (torchrun, gloo): the stacked adapters are cut into each rank's shards as the live
LoRA parameters are, and the row-parallel layers' rank-r activations are all-reduced as the live pair does, so a
mixed batch at TP2 gives the greedy tokens and logits of the same batch at TP1, and each row's tokens alone."""

import json

import pytest
import torch

from tests.conftest import torchrun

pytestmark = [pytest.mark.megatron, pytest.mark.slow]  # ~45 s on a 2-core CPU (torchrun, two ranks)


def test_mixed_batch_at_tp2_equals_tp1(tmp_path, cache_env, monkeypatch):
    from nemo_adapt.generation.generate import SamplingParams, forward_logits, generate
    from nemo_adapt.generation.multi_lora import MultiLoRA, load_lora_adapters, serving_config
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig
    from tests.unit.test_multi_lora import ADAPTERS, PROMPTS, _base, _save

    monkeypatch.setenv("NEMO_ADAPT_CACHE", cache_env["NEMO_ADAPT_CACHE"])  # the same random:tiny_llama files
    runtime.initialize(runtime.ParallelLayout(), seed=0)
    dirs = []
    for i, (rank, alpha, seed) in enumerate(ADAPTERS):
        model, source = _base()
        cfg = LoRAConfig(rank=rank, alpha=alpha)
        apply_peft(model, cfg, seed=0)
        dirs.append(str(_save(model, source, tmp_path / f"adapter{i}", cfg, seed)))
    index = [3, 0, -1, 1, 2, 3]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(index))]
    new = 5

    model, source = _base()
    spec = source.spec
    adapters = load_lora_adapters(dirs, source)
    apply_peft(model, serving_config(adapters), seed=0)
    with MultiLoRA(model, adapters) as served, served.mixed(index):
        tp1 = generate(model, prompts, SamplingParams(max_new_tokens=new), set(), spec.vocab_size, spec.hidden_size)
        same_length = [p[:min(map(len, prompts))] for p in prompts]
        tp1_logits = forward_logits(model, torch.tensor(same_length), spec.vocab_size, spec.hidden_size)

    out = tmp_path / "tp2.json"
    torchrun(2, "tests/distributed/multi_lora_worker.py", "--tp", "2", "--adapters", ",".join(dirs),
             "--index", ",".join(map(str, index)), "--prompts", json.dumps(prompts), "--new-tokens", str(new),
             "--out", str(out), env=cache_env)
    tp2 = json.loads(out.read_text())
    assert tp2["mixed"] == tp2["alone"] == tp1
    assert (torch.tensor(tp2["logits"]) - tp1_logits).abs().max() <= 1e-4
    assert len({tuple(o) for o in tp1[:4]}) > 1  # rows really differ
