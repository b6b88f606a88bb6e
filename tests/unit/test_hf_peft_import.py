"""Hugging Face PEFT adapters in: an adapter made by `peft` itself, or our own export, converted by its method's
`from_hf_peft` and applied to our Megatron model gives the logits `PeftModel` gives; export -> import returns the
artifact's tensors."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import write_tiny_hf_checkpoint
from tests.unit.test_hf_peft_export import PROMPTS

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf_base") / "tiny_llama", name="tiny_llama")


def _ours(base_dir, adapter_dir):
    """Logits of our model with the adapter at `adapter_dir` (either format) loaded, and the loaded adapter."""
    from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter, open_adapter
    from nemo_adapt.generation.generate import forward_logits
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    files = open_adapter(adapter_dir)
    source = open_source(str(base_dir))
    adapter = load_adapter(files, source)
    model, source = load_model(source)
    apply_peft(model, adapter.config, seed=1)  # another seed: every value must come from the adapter
    apply_adapter(model, adapter)
    return forward_logits(model, PROMPTS, source.spec.vocab_size, source.spec.hidden_size), adapter


def _peft_made(base_dir, out, peft_config, scale: float = 0.3):
    """An adapter made by `peft.get_peft_model` with every weight randomised, saved to `out`; PeftModel's logits."""
    import transformers
    from peft import get_peft_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(hf, peft_config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(p * (1 + scale * noise) if ("magnitude" in name or "ia3_l" in name) else scale * noise)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=PROMPTS).logits[:, -PROMPTS.shape[1]:]  # the real tokens' positions
    model.save_pretrained(str(out))
    return logits


def _peft_configs():
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    lm = TaskType.CAUSAL_LM
    return {
        # HF PEFT's default Llama targets (q, v): k's rows of the fused linear_qkv stay the base's.
        "lora_q_v": LoraConfig(task_type=lm, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        # different ranks and alphas per module, rsLoRA scaling, some layers only
        "lora_patterns_rslora": LoraConfig(task_type=lm, r=4, lora_alpha=6, use_rslora=True, layers_to_transform=[0, 2],
                                           target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
                                           rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3}),
        "dora_q_v_up": LoraConfig(task_type=lm, r=4, lora_alpha=8, use_dora=True,
                                  target_modules=["q_proj", "v_proj", "up_proj"]),
        "ia3": IA3Config(task_type=lm, target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
        "ia3_keys_only": IA3Config(task_type=lm, target_modules=["k_proj"], feedforward_modules=[]),
        "prompt_tuning": PromptTuningConfig(task_type=lm, num_virtual_tokens=5),
        "prefix_tuning": PrefixTuningConfig(task_type=lm, num_virtual_tokens=4),
    }


@pytest.mark.parametrize("case", ["lora_q_v", "lora_patterns_rslora", "dora_q_v_up", "ia3", "ia3_keys_only",
                                  "prompt_tuning", "prefix_tuning"])
def test_an_adapter_made_by_hf_peft_imports_and_gives_peft_model_logits(tmp_path, base_dir, case):
    import transformers

    # Scaling keys alone moves a tiny random model's logits little: scale them further from one.
    theirs = _peft_made(base_dir, tmp_path / "peft", _peft_configs()[case], scale=3.0 if case == "ia3_keys_only" else 0.3)
    ours, adapter = _ours(base_dir, tmp_path / "peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with torch.no_grad():
        base_logits = hf(PROMPTS).logits
    assert (theirs - base_logits).abs().max() > 1e-2, "the adapter changed nothing"
    diff = (theirs - ours).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff:.3g}"
    if case == "lora_q_v":  # q and v have their own A: stacked, rank 2r, alpha keeps alpha / r
        assert (adapter.config.rank, adapter.config.alpha, adapter.config.target_modules) == (8, 16.0, ["linear_qkv"])
    if case == "lora_patterns_rslora":
        assert adapter.config.layers == [0, 2]
        assert adapter.config.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@pytest.mark.parametrize("peft", [
    {"method": "lora", "rank": 4, "alpha": 8},
    {"method": "lora", "rank": 3, "alpha": 5, "target_modules": ["linear_qkv", "linear_fc1"], "layers": [1, 3]},
    {"method": "dora", "rank": 4, "alpha": 8},
    {"method": "ia3"},
    {"method": "prompt_tuning", "num_virtual_tokens": 5, "init": "random"},
    {"method": "p_tuning", "num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden": 16},
    {"method": "prefix_tuning", "num_prefix_tokens": 3, "reparameterize": False},
    {"method": "prefix_tuning", "num_prefix_tokens": 3, "reparam_hidden": 16},
], ids=["lora", "lora_fused_some_layers", "dora", "ia3", "prompt_tuning", "p_tuning", "prefix_direct", "prefix_mlp"])
def test_export_then_import_gives_back_the_adapter(tmp_path, base_dir, peft):
    from nemo_adapt.cli import main
    from nemo_adapt.peft.base import peft_config_class

    art, out = tmp_path / "artifact", tmp_path / "peft"
    if peft["method"] in ("lora", "dora", "ia3"):
        from tests.unit.test_hf_peft_export_dora_ia3 import _trained_artifact

        logits = _trained_artifact(base_dir, art, peft_config_class(peft["method"])(**peft))[0]
    else:
        from tests.unit.test_hf_peft_export_virtual import _trained_artifact

        logits = _trained_artifact(base_dir, art, peft)[0]
    assert main(["export", str(out), "--adapter", str(art), "--format", "peft"]) == 0
    imported_logits, adapter = _ours(base_dir, out)
    assert (imported_logits - logits).abs().max() <= 1e-5
    saved = load_file(str(art / "adapter_model.safetensors"))
    if peft["method"] in ("lora", "dora", "ia3", "prompt_tuning"):
        assert adapter.config == peft_config_class(peft["method"])(**peft)
        assert adapter.tensors.keys() == saved.keys()
        assert all(torch.equal(adapter.tensors[k], saved[k]) for k in saved), "not the same tensors"
    elif peft.get("reparameterize") is False:
        assert adapter.config == peft_config_class(peft["method"])(**peft)
        assert adapter.tensors.keys() == saved.keys()
        for k in saved:  # keys rotated to position n and back in float64: equal up to float32 rounding
            tol = 0 if k.endswith("prefix_value") else 1e-6
            assert (adapter.tensors[k] - saved[k]).abs().max() <= tol, k
    else:  # collapsed on export: p-tuning comes back as its prompt table, an MLP prefix as its prefixes
        assert adapter.config.method == {"p_tuning": "prompt_tuning", "prefix_tuning": "prefix_tuning"}[peft["method"]]
    assert json.loads((out / "adapter_config.json").read_text())["nemo_adapt"]["source_format"] == "nemo-adapt"


def _write_hf_peft(directory, config: dict, tensors: dict):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", **config}))
    save_file({k: v.clone() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


def test_import_refuses_what_it_cannot_represent_naming_the_setting_or_tensor(tmp_path, base_dir):
    from nemo_adapt.errors import CheckpointError, ConfigError

    lora = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    a, b = torch.ones(2, 64), torch.ones(64, 2)
    good = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b}
    cases = [
        ({**lora, "bias": "all"}, good, ConfigError, "bias='all' has no nemo-adapt form"),
        ({**lora, "modules_to_save": ["lm_head"]}, good, ConfigError, "modules_to_save"),
        (lora, {**good, "base_model.model.lm_head.lora_A.weight": a}, ConfigError, "lm_head"),
        (lora, {k.replace("layers.0", "layers.9"): v for k, v in good.items()}, ConfigError, "is on layer 9"),
        (lora, {k: (v[:, :10] if "lora_A" in k else v) for k, v in good.items()}, ConfigError, "needs [r, 64]"),
        (lora, {k: v for k, v in good.items() if "lora_A" in k}, ConfigError, "needs lora_A and lora_B"),
        ({"peft_type": "IA3"}, {"base_model.model.model.layers.0.self_attn.q_proj.ia3_l": torch.ones(64, 1)},
         ConfigError, "has no nemo-adapt IA3 form"),
        ({"peft_type": "IA3"}, {"base_model.model.model.layers.0.mlp.down_proj.ia3_l": torch.ones(64, 1)},
         ConfigError, "scales down_proj's input"),
        ({"peft_type": "LOHA"}, good, ConfigError, "peft_type='LOHA' has no nemo-adapt form"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}, {"prompt_embeddings": torch.ones(3, 7)},
         ConfigError, "needs [3, 64]"),
        ({"something": 1}, good, CheckpointError, "is neither a nemo-adapt adapter"),
    ]
    load = _ours
    for i, (config, tensors, error, message) in enumerate(cases):
        d = _write_hf_peft(tmp_path / f"case{i}", config, tensors)
        with pytest.raises(error) as info:
            load(base_dir, d)
        assert message in str(info.value), (i, str(info.value))
        assert str(d) in str(info.value), (i, "the message names the adapter directory")
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text(json.dumps(lora))
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="is a pickle and is not loaded"):
        load(base_dir, pickle_only)


def test_eval_and_generate_take_an_hf_peft_adapter(tmp_path, capsys, monkeypatch):
    """`eval RUN --adapter DIR` scores another adapter (here made by `peft`) on the run's task, written beside the
    run's own results; `generate --adapter DIR` gives PeftModel's greedy tokens."""
    import transformers
    from peft import LoraConfig, PeftModel, TaskType

    from nemo_adapt.cli import main
    from nemo_adapt.config import load_recipe, save_resolved
    from nemo_adapt.models.loader import resolve_path
    from nemo_adapt.tokenizer import load_tokenizer
    from tests.conftest import write_tiny_chat_data, write_tiny_recipe

    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    base = resolve_path("random:tiny_llama")
    _peft_made(base, tmp_path / "hf_lora", LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj", "down_proj"]), scale=1.0)
    data = write_tiny_chat_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    save_resolved(load_recipe(write_tiny_recipe(tmp_path, data, eval={"max_new_tokens": 6})), run_dir / "config.yaml")
    assert main(["eval", str(run_dir), "--adapter", str(tmp_path / "hf_lora")]) == 0
    digest = hashlib.sha256(str((tmp_path / "hf_lora").resolve()).encode()).hexdigest()[:8]
    written = json.loads((run_dir / f"eval_{tmp_path.name}_hf_lora-{digest}.json").read_text())
    assert written["adapter_format"] == "hf-peft" and written["n"] == 16
    assert not (run_dir / "eval.json").exists()
    assert "written" in capsys.readouterr().out

    tok = load_tokenizer(base)
    prompt = "abcd"
    assert main(["generate", "--adapter", str(tmp_path / "hf_lora"), "--checkpoint", str(base), "--raw",
                 "--max-new-tokens", "8", prompt]) == 0
    ours = capsys.readouterr().out.strip()
    assert ours, "nothing generated: the comparison would say nothing"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                      str(tmp_path / "hf_lora")).eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             eos_token_id=list(load_tokenizer(base).all_special_ids), pad_token_id=0)
    assert ours == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    # a hub id as base_model_name_or_path, no --checkpoint: no hub is reached, so the base must be given
    config = json.loads((tmp_path / "hf_lora" / "adapter_config.json").read_text())
    (tmp_path / "hf_lora" / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert main(["generate", "--adapter", str(tmp_path / "hf_lora"), "hello"]) == 2
    assert "which is not a local checkpoint (no model hub is reached)" in capsys.readouterr().err


def test_a_damaged_adapter_config_is_refused_naming_the_file_before_weights_are_read(tmp_path, base_dir):
    """A setting that shapes the tensors missing or of the wrong type in our config, or a string `r` in HF PEFT's:
    refused with adapter_config.json named — never a default standing in for what the adapter was trained with."""
    from peft import LoraConfig, TaskType

    from nemo_adapt.artifacts.adapter import open_adapter
    from nemo_adapt.errors import CheckpointError, ConfigError
    from tests.unit.test_hf_peft_export import _trained_artifact

    art = tmp_path / "ours"
    _trained_artifact(base_dir, art)
    config = json.loads((art / "adapter_config.json").read_text())
    for peft, message in (({k: v for k, v in config["peft"].items() if k != "rank"}, "peft.rank missing"),
                          ({**config["peft"], "rank": "sixteen"}, "peft.rank='sixteen' must be an integer")):
        (art / "adapter_config.json").write_text(json.dumps({**config, "peft": peft}))
        (art / "adapter_model.safetensors").rename(art / "moved")  # proves no weights are needed to refuse it
        (art / "adapter_model.safetensors").write_bytes(b"")
        with pytest.raises(CheckpointError, match=message) as info:
            open_adapter(art)
        assert str(art / "adapter_config.json") in str(info.value)
        (art / "moved").replace(art / "adapter_model.safetensors")
    _peft_made(base_dir, tmp_path / "hf", LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4,
                                                     target_modules=["q_proj"]))
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    (tmp_path / "hf" / "adapter_config.json").write_text(json.dumps({**hf_config, "r": "2"}))
    with pytest.raises(ConfigError, match=r"hf: r='2' must be a positive integer"):
        _ours(base_dir, tmp_path / "hf")
