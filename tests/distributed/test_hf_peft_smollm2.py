"""Adapters out and in at SmolLM2-135M scale (the embedded model, exported to a Hugging Face directory once):
every method's HF PEFT export gives our logits and greedy tokens; an adapter made by `peft` itself imports and
gives `PeftModel`'s logits; a LoRA trained at TP3 and folded into the weights at TP3 under torchrun writes the TP1
files and gives our adapted model's and `merge_and_unload()`'s logits. Every adapter of ours here is trained briefly
first (a few optimizer steps through the engine), not set by hand."""

import json

import pytest
import torch

from nemo_adapt.cli import main
from tests.conftest import REPO, torchrun
from tests.peft_reference import hf_model as _hf
from tests.peft_reference import peft_logits_and_tokens

pytestmark = [pytest.mark.megatron, pytest.mark.slow]
NEW_TOKENS = 16
TOL = 1e-4


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    assert main(["export", str(out), "--checkpoint", "embedded:smollm2_135m"]) == 0
    return out


@pytest.fixture(scope="module")
def prompts(smollm2_hf):
    from nemo_adapt.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_hf)
    texts = ["The capital of France is", "def fibonacci(n):", "Printer on floor 3 is jammed. Team:",
             "Once upon a time there"]
    ids = [tok(t)["input_ids"] for t in texts]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])  # equal lengths: no padding on either side


def _ours(base, prompts, peft: dict | None = None, adapter_dir=None, out=None, model_name=None):
    """Our model on `base` (opened as `model_name`, default: what its config says): with a method applied,
    trained briefly and saved to `out`, or with the adapter at `adapter_dir` loaded. Returns (logits, greedy
    tokens)."""
    from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter, save_adapter
    from nemo_adapt.generation.generate import SamplingParams, forward_logits, generate
    from nemo_adapt.models.loader import base_fingerprint, load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft, peft_config_class

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    source = open_source(str(base), model_name)
    adapter = load_adapter(adapter_dir, source) if adapter_dir is not None else None
    model, source = load_model(source)
    spec = source.spec
    config = adapter.config if adapter is not None else peft_config_class(peft["method"])(**peft)
    method = apply_peft(model, config, seed=0)
    if adapter is not None:
        apply_adapter(model, adapter)
    else:
        if peft["method"] == "prefix_tuning":
            _prefix_from_activations(model, base, spec)
        _train_briefly(model, method, config, base)
        save_adapter(model, out, config, {"base_model": spec.name, "base_checkpoint": str(base),
                                          "base_model_fingerprint": base_fingerprint(source)})
    logits = forward_logits(model, prompts, spec.vocab_size, spec.hidden_size)
    tokens = generate(model, prompts.tolist(), SamplingParams(max_new_tokens=NEW_TOKENS), set(), spec.vocab_size,
                      spec.hidden_size)
    return logits, tokens


# Brief training: 4 AdamW steps on 4 short tickets (one per padded row), through the engine a run uses. The rates
# move SmolLM2's logits by about 1 to 5 on the prompts, as a short real run does; far larger moves wreck the model
# and amplify float32 rounding past 1e-4 on both sides (the base models alone differ by 6e-5 on these prompts).
TRAIN_TEXTS = ["Ticket: VPN drops every hour. Team: network. Priority: high.",
               "Ticket: need a new mouse. Team: hardware. Priority: low.",
               "Ticket: payroll export fails. Team: finance-apps. Priority: high.",
               "Ticket: password reset for a contractor. Team: identity. Priority: medium."]
TRAIN_STEPS, TRAIN_SEQ = 4, 24
TRAIN_LR = {"lora": 2e-3, "dora": 2e-3, "ia3": 2e-2, "prompt_tuning": 2e-2, "p_tuning": 2e-4, "prefix_tuning": 2e-2}


def _train_briefly(model, method, peft_config, base) -> None:
    from nemo_adapt.config.schema import RecipeConfig
    from nemo_adapt.tokenizer import load_tokenizer
    from nemo_adapt.training import engine

    cfg = RecipeConfig()
    cfg.peft = peft_config
    cfg.train.global_batch_size = cfg.train.micro_batch_size = len(TRAIN_TEXTS)
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps = TRAIN_LR[peft_config.method], "constant", 0
    model.config.calculate_per_token_loss = True
    ddp = engine.wrap_ddp(model, cfg)
    optimizer = engine.build_optimizer(ddp, cfg, method.lr_multipliers())
    engine.connect_schedule_hooks(ddp, optimizer)
    tok = load_tokenizer(base)
    rows = {k: torch.zeros(len(TRAIN_TEXTS), TRAIN_SEQ, dtype=torch.long) for k in ("tokens", "labels", "segment_ids")}
    rows["loss_mask"] = torch.zeros(len(TRAIN_TEXTS), TRAIN_SEQ)
    rows["position_ids"] = torch.arange(TRAIN_SEQ).expand(len(TRAIN_TEXTS), -1).clone()
    for i, text in enumerate(TRAIN_TEXTS):
        ids = torch.tensor(tok(text)["input_ids"][:TRAIN_SEQ + 1])
        n = len(ids) - 1
        rows["tokens"][i, :n], rows["labels"][i, :n] = ids[:-1], ids[1:]
        rows["segment_ids"][i, :n], rows["loss_mask"][i, :n] = 1, 1.0
    losses = [engine.train_step(ddp, optimizer, [rows], TRAIN_SEQ, len(TRAIN_TEXTS), cfg.optim.lr)[0]
              for _ in range(TRAIN_STEPS)]
    assert losses[-1] < losses[0], f"{peft_config.method}: brief training did not lower the loss: {losses}"


CONTEXT = "You sort IT support tickets by team and priority."


@torch.no_grad()
def _prefix_from_activations(model, base, spec) -> int:
    """Set a prefix-tuning model's prefixes to the keys and values SmolLM2 computes for a real text (Li & Liang
    2021's initialisation from real activations): the model then reads as if that text came first, as a trained
    prefix does. Random prefixes (any scale) instead wreck SmolLM2, whose attention sink they compete with:
    logits move by 30 to 45, and float32 rounding on both sides grows past 1e-4. Returns the prefix length."""
    from nemo_adapt.peft.prefix_tuning import rotate_keys
    from nemo_adapt.tokenizer import load_tokenizer

    ids = torch.tensor([load_tokenizer(base)(CONTEXT)["input_ids"]])
    cache = _hf(base)(ids, use_cache=True).past_key_values
    n = ids.shape[1]
    params = dict(model.named_parameters())
    for layer in range(spec.num_layers):
        name = f"decoder.layers.{layer}.self_attention.core_attention"
        keys = cache.layers[layer].keys[0].transpose(0, 1)  # [n, kv heads, head dim], rotated to positions 0..n-1
        # Ours carry no position; HF PEFT's real tokens sit at n.. behind them, ours at 0..: rotate back by n.
        params[f"{name}.prefix_key"].copy_(rotate_keys(keys, -n, spec))
        params[f"{name}.prefix_value"].copy_(cache.layers[layer].values[0].transpose(0, 1))
    return n


# LoRA, DoRA and prefix tuning (the export that splits fused layers, the one that splits magnitudes too, the one
# that rotates keys) run in CI; IA3, prompt and p-tuning — simpler mappings, each also checked on the tiny model
# after training in the PEFT battery — are `exhaustive` (NEMO_ADAPT_TESTS=full), about 4 minutes of CI.
METHODS = [
    pytest.param({"method": "lora", "rank": 8, "alpha": 16}, id="lora"),
    # DoRA on the fused layers only (their magnitudes split into q/k/v and gate/up): it takes every weight's row
    # norms at each forward, which on all seven projections made this the slowest case by far.
    pytest.param({"method": "dora", "rank": 8, "alpha": 16, "target_modules": ["linear_qkv", "linear_fc1"]}, id="dora"),
    pytest.param({"method": "ia3"}, id="ia3", marks=pytest.mark.exhaustive),
    pytest.param({"method": "prompt_tuning", "num_virtual_tokens": 8, "init": "vocab"}, id="prompt_tuning",
                 marks=pytest.mark.exhaustive),
    pytest.param({"method": "p_tuning", "num_virtual_tokens": 8}, id="p_tuning", marks=pytest.mark.exhaustive),
    pytest.param({"method": "prefix_tuning", "num_prefix_tokens": 10, "reparameterize": False},  # CONTEXT's 10 tokens
                 id="prefix_tuning"),
]


@pytest.mark.parametrize("peft", METHODS)
def test_smollm2_export_of_every_method_gives_our_logits_and_tokens(tmp_path, smollm2_hf, prompts, peft):
    ours, our_tokens = _ours(smollm2_hf, prompts, peft, out=tmp_path / "artifact")
    assert main(["export", str(tmp_path / "peft"), "--adapter", str(tmp_path / "artifact"), "--format", "peft"]) == 0
    virtual = peft["method"] in ("prompt_tuning", "p_tuning", "prefix_tuning")
    theirs, their_tokens = peft_logits_and_tokens(smollm2_hf, tmp_path / "peft", prompts, NEW_TOKENS,
                                                  use_generate=not virtual)
    with torch.no_grad():
        base = _hf(smollm2_hf)(prompts).logits
    assert (theirs - base).abs().max() > 1e-2, "the adapter changed nothing"
    diff = (theirs - ours).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff:.3g}"
    assert their_tokens == our_tokens


def test_smollm2_adapter_made_by_peft_imports_with_peft_model_logits(tmp_path, smollm2_hf, prompts):
    """`get_peft_model` on the Hugging Face export of SmolLM2, weights randomised: our logits within 1e-4, and
    export -> import gives the same tensors back."""
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import load_file

    model = get_peft_model(_hf(smollm2_hf), LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16,
                                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
        theirs = model.eval()(input_ids=prompts).logits
    model.save_pretrained(str(tmp_path / "made_by_peft"))
    ours, _ = _ours(smollm2_hf, prompts, adapter_dir=tmp_path / "made_by_peft")
    assert (theirs - _hf(smollm2_hf)(prompts).logits).abs().max() > 1e-2
    diff = (theirs - ours).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff:.3g}"

    # ours -> HF PEFT -> ours: the same tensors
    _ours(smollm2_hf, prompts, {"method": "lora", "rank": 8, "alpha": 16}, out=tmp_path / "artifact")
    assert main(["export", str(tmp_path / "peft"), "--adapter", str(tmp_path / "artifact"), "--format", "peft"]) == 0
    from nemo_adapt.artifacts.adapter import load_adapter
    from nemo_adapt.models.loader import open_source

    back = load_adapter(tmp_path / "peft", open_source(str(smollm2_hf)))
    saved = load_file(str(tmp_path / "artifact" / "adapter_model.safetensors"))
    assert back.tensors.keys() == saved.keys() and all(torch.equal(back.tensors[k], saved[k]) for k in saved)


@pytest.mark.exhaustive  # ~5 min; the battery folds trained adapters at TP2xPP2 on every CI run
def test_smollm2_lora_trained_and_merged_at_tp3_equals_tp1_our_model_and_merge_and_unload(tmp_path, smollm2_hf,
                                                                                          prompts):
    """The shipped LoRA recipe trained for 3 steps at TP3 (SmolLM2's 9 heads in 3 KV groups split 3 ways), then
    folded into the base at TP3 and at TP1: the same files; `transformers` on the TP3 export gives our adapted
    model's logits and HF PEFT's `merge_and_unload()`'s within 1e-4."""
    from peft import PeftModel
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    torchrun(3, "-m nemo_adapt.cli", "run", str(REPO / "recipes" / "smollm2_135m_lora.yaml"),
             f"run.output_dir={run_dir}", "run.max_steps=3", "run.eval_batches=1", f"model.checkpoint={smollm2_hf}",
             "data.seq_length=128", "parallel.tensor=3", "optim.warmup_steps=0", "optim.lr=2e-3",
             "eval.enabled=false", timeout=900)
    art = str(run_dir / "adapter")
    from nemo_adapt.config import load_resolved

    assert load_resolved(run_dir / "config.yaml").parallel.tensor == 3
    ours, _ = _ours(smollm2_hf, prompts, adapter_dir=run_dir / "adapter", model_name="smollm2_135m")
    assert main(["export", str(tmp_path / "tp1"), "--adapter", art]) == 0
    torchrun(3, "-m nemo_adapt.cli", "export", str(tmp_path / "tp3"), "--adapter", art, "--tensor-parallel", "3",
             timeout=900)
    tp1, tp3 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("tp1", "tp3"))
    assert tp1.keys() == tp3.keys()
    worst = max((tp1[k] - tp3[k]).abs().max().item() for k in tp1)
    assert worst <= 1e-6, f"TP3's fold differs from TP1's by {worst}"
    assert sorted(p.name for p in (tmp_path / "tp3").iterdir()) == sorted(p.name for p in (tmp_path / "tp1").iterdir())
    with torch.no_grad():
        merged = _hf(tmp_path / "tp3")(prompts).logits
        assert (merged - _hf(smollm2_hf)(prompts).logits).abs().max() > 1e-2, "3 steps of training changed nothing"
    assert (merged - ours).abs().max() <= TOL
    assert main(["export", str(tmp_path / "peft"), "--adapter", art, "--format", "peft"]) == 0
    unloaded = PeftModel.from_pretrained(_hf(smollm2_hf), str(tmp_path / "peft")).merge_and_unload().eval()
    with torch.no_grad():
        assert (merged - unloaded(prompts).logits).abs().max() <= TOL
    assert json.loads((tmp_path / "tp3" / "config.json").read_text())["model_type"] == "llama"
