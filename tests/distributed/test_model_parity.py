"""Logit and generation parity with `transformers` at TP/PP layouts, on CPU over gloo with torchrun.

SmolLM2-135M has 9 query heads and 3 KV heads, so its tensor-parallel sizes are 1 and 3 (TP2 is
refused, see tests/unit/test_model_errors.py); the tiny Qwen2-style model covers TP2 and TP2xPP2.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import dump_json, torchrun

WORKER = Path(__file__).with_name("parity_worker.py")
pytestmark = [pytest.mark.megatron, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_chat_prompts):
    """transformers' logits and greedy generations for the chat prompts (the numerical reference)."""
    from transformers import AutoModelForCausalLM

    from nemo_adapt.models.embedded import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    logits, generated = [], []
    with torch.no_grad():
        for p in smollm2_chat_prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0])
            out = model.generate(ids, max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
            if out and out[-1] == model.config.eos_token_id:
                out = out[:-1]
            generated.append(out)
    return logits, generated


@pytest.mark.parametrize("tp,pp", [
    pytest.param(1, 1, id="tp1"),
    # TP3 alone and PP2 alone: TP3xPP2 runs both kinds of split at once (and the tiny model each alone).
    pytest.param(3, 1, id="tp3", marks=pytest.mark.exhaustive),
    pytest.param(1, 2, id="pp2", marks=pytest.mark.exhaustive),
    pytest.param(3, 2, id="tp3xpp2"),
])
def test_smollm2_gguf_logits_and_greedy_match_transformers(tp, pp, tmp_path, smollm2_chat_prompts,
                                                            smollm2_reference):
    ref_logits, ref_generated = smollm2_reference
    prompts = dump_json(tmp_path / "prompts.json", smollm2_chat_prompts)
    torchrun(tp * pp, WORKER, "--checkpoint", "embedded:smollm2_135m", "--tp", str(tp), "--pp", str(pp),
             "--out", str(tmp_path), "--prompts", str(prompts), "--generate", "32")
    ours = load_file(str(tmp_path / "logits.safetensors"))
    for i, ref in enumerate(ref_logits):
        delta = (ours[f"prompt{i}"] - ref).abs().max().item()
        assert delta <= 1e-3, f"prompt {i}: max |dlogit| {delta:.2e} > 1e-3 at TP{tp} PP{pp}"
    import json

    generated = json.loads((tmp_path / "generated.json").read_text())
    assert generated == ref_generated
    assert all(len(g) > 0 for g in generated)


@pytest.fixture(scope="module")
def tiny_reference(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 17, 32, 9)]
    with torch.no_grad():
        logits = [model(torch.tensor([p])).logits[0] for p in prompts]
    return prompts, logits


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["tp1", "tp2", "pp2", "tp2xpp2"])
def test_tiny_qkv_bias_untied_hf_dir_matches_transformers(tp, pp, tmp_path, tiny_hf_dir, tiny_reference):
    prompts, ref_logits = tiny_reference
    pfile = dump_json(tmp_path / "prompts.json", prompts)
    torchrun(tp * pp, WORKER, "--checkpoint", str(tiny_hf_dir), "--model", "tiny_qwen2", "--tp", str(tp),
             "--pp", str(pp), "--out", str(tmp_path), "--prompts", str(pfile))
    ours = load_file(str(tmp_path / "logits.safetensors"))
    for i, ref in enumerate(ref_logits):
        delta = (ours[f"prompt{i}"] - ref).abs().max().item()
        assert delta <= 1e-3, f"prompt {i}: max |dlogit| {delta:.2e} > 1e-3 at TP{tp} PP{pp}"


def test_export_roundtrip_and_tp_independence(tmp_path, tiny_hf_dir, tiny_reference):
    """Export at TP1 and TP2 gives identical files; transformers loads them with our logits (<= 1e-4)."""
    from transformers import AutoModelForCausalLM

    prompts, _ = tiny_reference
    pfile = dump_json(tmp_path / "prompts.json", prompts)
    exports = {}
    for tp in (1, 2):
        run = tmp_path / f"tp{tp}"
        run.mkdir()
        exports[tp] = tmp_path / f"export_tp{tp}"
        torchrun(tp, WORKER, "--checkpoint", str(tiny_hf_dir), "--model", "tiny_qwen2", "--tp", str(tp),
                 "--out", str(run), "--prompts", str(pfile), "--export", str(exports[tp]))
    files1 = sorted(p.name for p in exports[1].iterdir())
    assert files1 == sorted(p.name for p in exports[2].iterdir())
    assert "config.json" in files1 and "model.safetensors" in files1
    assert (exports[1] / "config.json").read_text() == (exports[2] / "config.json").read_text()
    t1, t2 = load_file(str(exports[1] / "model.safetensors")), load_file(str(exports[2] / "model.safetensors"))
    assert t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)

    ours = load_file(str(tmp_path / "tp1" / "logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(exports[2]), dtype=torch.float32).eval()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            delta = (model(torch.tensor([p])).logits[0] - ours[f"prompt{i}"]).abs().max().item()
            assert delta <= 1e-4, f"prompt {i}: exported model differs by {delta:.2e}"
