"""`peft.init_from`: a fresh run starts its adapter from a saved one (ours or Hugging Face PEFT), with the adapter's
settings replacing the recipe's (one warning naming each); bad adapters are refused before data preparation."""

import json

import pytest
import torch

from tests.conftest import read_metrics
from tests.conftest import run_tiny as _run

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory, cache_env):
    """A LoRA on q_proj/v_proj made by `peft.get_peft_model` on the tiny base, weights randomised."""
    import os

    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    from nemo_adapt.models.loader import resolve_path

    old = os.environ.get("NEMO_ADAPT_CACHE")
    os.environ["NEMO_ADAPT_CACHE"] = cache_env["NEMO_ADAPT_CACHE"]
    try:
        base = resolve_path("random:tiny_llama")
    finally:
        os.environ.pop("NEMO_ADAPT_CACHE") if old is None else os.environ.__setitem__("NEMO_ADAPT_CACHE", old)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("peft_made") / "adapter"
    model.save_pretrained(str(out))
    return out


def test_a_run_starts_from_an_hf_peft_adapter_with_its_settings(tmp_path, tiny_data, cache_env, peft_made):
    from safetensors.torch import load_file

    from nemo_adapt.artifacts.adapter import load_adapter
    from nemo_adapt.config import load_resolved
    from nemo_adapt.models.loader import open_source

    # A learning rate of 1e-12 moves nothing measurable in one step: the adapter saved is the one started from.
    still = {"run": {"max_steps": 1}, "optim": {"lr": 1e-12, "schedule": "constant"}}
    run_dir, proc = _run(tmp_path, "from_hf", tiny_data, cache_env, **still,
                         overrides=[f"peft.init_from={peft_made}"])
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: peft.init_from")]
    assert warned == [f"warning: peft.init_from={str(peft_made)!r}: the adapter's settings replace the recipe's: "
                      "peft.rank 4 -> 8, peft.alpha 8.0 -> 16.0, peft.target_modules ['linear_qkv', 'linear_proj', "
                      "'linear_fc1', 'linear_fc2'] -> ['linear_qkv']"]
    assert f"adapter starts from peft.init_from={str(peft_made)!r} (hf-peft, 8 tensors)" in proc.stdout
    resolved = load_resolved(run_dir / "config.yaml")
    assert (resolved.peft.rank, resolved.peft.init_from) == (8, str(peft_made))

    import os

    os.environ["NEMO_ADAPT_CACHE"] = cache_env["NEMO_ADAPT_CACHE"]
    try:
        expected = load_adapter(peft_made, open_source("random:tiny_llama", "tiny_llama")).tensors
    finally:
        del os.environ["NEMO_ADAPT_CACHE"]
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    assert max((saved[k] - expected[k]).abs().max().item() for k in saved) <= 1e-8

    # The same step from the recipe's own fresh adapter (B = 0: the base) has another loss.
    fresh_dir, _ = _run(tmp_path, "fresh", tiny_data, cache_env, **still)
    loss = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m][0]
    fresh = [m["train/loss"] for m in read_metrics(fresh_dir) if "train/loss" in m][0]
    assert abs(loss - fresh) > 1e-3

    # Continuing our own artifact: its settings are the recipe's already, so nothing is replaced.
    _, proc = _run(tmp_path, "from_ours", tiny_data, cache_env, **still, peft={"rank": 8, "alpha": 16.0},
                   overrides=[f"peft.init_from={run_dir / 'adapter'}", "peft.target_modules=[linear_qkv]"])
    assert "the adapter's settings replace" not in proc.stderr
    assert "(nemo-adapt, 8 tensors)" in proc.stdout


def test_bad_init_from_is_refused_before_data_preparation(tmp_path, tiny_data, cache_env, peft_made):
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.ones(32, 1)},
              str(ia3 / "adapter_model.safetensors"))
    for value, message in ((tmp_path, "peft.init_from: "),
                           (ia3, "is a ia3 adapter (hf-peft), but peft.method=lora; set peft.method=ia3")):
        _, proc = _run(tmp_path, "bad", tiny_data, cache_env, check=False, overrides=[f"peft.init_from={value}"])
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-800:]
        assert "preparing data" not in proc.stdout
    _, proc = _run(tmp_path, "bad", tiny_data, cache_env, check=False, peft={"method": "none"},
                   overrides=[f"peft.init_from={peft_made}"])
    assert proc.returncode != 0 and "peft.method=none (full fine-tuning) has no adapter" in proc.stderr
