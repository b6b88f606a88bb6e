"""Several LoRA adapters over one tiny base (`generation.multi_lora`): a mixed-adapter batch gives each row
exactly what its adapter alone gives (row -1: the base), a hot-swap gives what a freshly loaded model gives,
and adapters that do not belong together are refused naming their directory."""

import json
import shutil

import pytest
import torch

from nemo_adapt.errors import CheckpointError, ConfigError
from nemo_adapt.generation import generate as G

pytestmark = pytest.mark.megatron
# A shared 9-token prefix (>= MIN_SHARED_PREFIX, so generate takes its shared-prefix path) and own parts of
# different lengths (so rows also advance through a masked second prefill chunk).
PREFIX = [5, 17, 33, 9, 12, 8, 21, 7, 30]
PROMPTS = [PREFIX + [11, 6, 14], PREFIX + [40, 41, 42, 43, 3], PREFIX + [90, 2 + 60]]
NEW = 6
# (rank, alpha, weight seed): the last one has another rank (served zero-padded) and its own scale.
ADAPTERS = [(4, 8, 1), (4, 4, 2), (4, 16, 3), (8, 8, 4)]


def _base():
    from nemo_adapt.models.loader import load_model, open_source

    source = open_source("random:tiny_llama", "tiny_llama")
    model, source = load_model(source)
    return model, source


def _save(model, source, out, cfg, seed):
    """Give every adapter weight a non-zero random value (B starts at zero) and save the artifact."""
    from nemo_adapt.artifacts.adapter import save_adapter
    from nemo_adapt.models.loader import base_fingerprint

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if getattr(p, "is_adapter", False):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    save_adapter(model, out, cfg, {"base_model": source.spec.name, "base_checkpoint": "random:tiny_llama",
                                   "base_model_fingerprint": base_fingerprint(source)})
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i, (rank, alpha, seed) in enumerate(ADAPTERS):
        model, source = _base()
        cfg = LoRAConfig(rank=rank, alpha=alpha)
        apply_peft(model, cfg, seed=0)
        dirs.append(_save(model, source, root / f"adapter{i}", cfg, seed))
    return dirs


@pytest.fixture
def served(adapter_dirs):
    """The base with LoRA at the largest rank, and the adapters stacked over it."""
    from nemo_adapt.generation.multi_lora import MultiLoRA, load_lora_adapters, serving_config
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    model, source = _base()
    adapters = load_lora_adapters(adapter_dirs, source)
    assert serving_config(adapters).rank == 8
    apply_peft(model, serving_config(adapters), seed=0)
    with MultiLoRA(model, adapters) as multi:
        yield model, source.spec, multi


def _gen(model, spec, prompts):
    return G.generate(model, prompts, G.SamplingParams(max_new_tokens=NEW), set(), spec.vocab_size, spec.hidden_size,
                      spec.max_position_embeddings)


def test_mixed_batch_equals_each_adapter_alone(served, monkeypatch):
    model, spec, multi = served
    # The same prompt under every adapter and the base (rows must differ only by their selection), then the
    # other prompts under a mix, the base row in the middle.
    rows = [(PROMPTS[0], k) for k in (0, 1, 2, 3, -1)] + [(PROMPTS[1], 2), (PROMPTS[2], -1), (PROMPTS[1], 0),
                                                         (PROMPTS[2], 3)]
    prompts, index = [p for p, _ in rows], [k for _, k in rows]
    copies = []
    original = G._copy_cached_rows
    monkeypatch.setattr(G, "_copy_cached_rows", lambda ctx, n, src: (copies.append((n, src.tolist())),
                                                                      original(ctx, n, src)))
    multi.activate(1)  # a hot-swapped adapter must not leak into the mixed rows
    with multi.mixed(index):
        mixed = _gen(model, spec, prompts)
    with multi.mixed([0, 1, 2, 3, -1]):
        mixed_logits = G.forward_logits(model, torch.tensor([PROMPTS[0]] * 5), spec.vocab_size, spec.hidden_size)
    # The shared prefix was prefilled once per adapter group (first rows 0, 1, 2, 3, 4 for keys 0, 1, 2, 3, -1),
    # and each row took its own group's cache.
    assert copies == [(len(PREFIX), [0, 1, 2, 3, 4, 2, 4, 0, 3])]
    after_block = _gen(model, spec, [PROMPTS[0]])[0]

    alone, alone_logits = [], []
    for p, k in rows:
        multi.activate(k)
        alone.append(_gen(model, spec, [p])[0])
    for k in (0, 1, 2, 3, -1):
        multi.activate(k)
        alone_logits.append(G.forward_logits(model, torch.tensor([PROMPTS[0]]), spec.vocab_size, spec.hidden_size))
    assert mixed == alone
    assert (mixed_logits - torch.cat(alone_logits)).abs().max() <= 1e-5
    # The selection matters: the four adapters and the base all answer the same prompt differently.
    assert len({tuple(o) for o in mixed[:5]}) == 5, mixed[:5]
    assert all(len(o) == NEW for o in mixed)
    assert after_block == mixed[1]  # adapter 1, hot-swapped before the block, was live again after it


def test_hot_swap_equals_a_freshly_loaded_model(served, adapter_dirs):
    from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter
    from nemo_adapt.peft.base import apply_peft

    model, spec, multi = served
    before = {n: p.detach().clone() for n, p in model.named_parameters() if getattr(p, "is_adapter", False)}
    outs = []
    for k in (2, 0, 3):  # out of order, and the zero-padded rank-8 adapter
        fresh, source = _base()
        adapter = load_adapter(adapter_dirs[k], source)
        apply_peft(fresh, adapter.config, seed=0)
        apply_adapter(fresh, adapter)
        expected = _gen(fresh, spec, PROMPTS)
        multi.activate(k)
        outs.append(_gen(model, spec, PROMPTS))
        assert outs[-1] == expected, f"adapter {k}"
    assert len({tuple(map(tuple, o)) for o in outs}) == 3
    multi.close()
    after = {n: p for n, p in model.named_parameters() if getattr(p, "is_adapter", False)}
    assert all(torch.equal(before[n], after[n]) for n in before), "close() did not restore the live modules"
    with pytest.raises(RuntimeError, match="closed"):
        multi.activate(0)


def test_bad_selection_is_refused(served):
    model, spec, multi = served
    with pytest.raises(ValueError, match=r"index\[1\]=4: adapter indices are 0..3, or -1 for the base"), \
            multi.mixed([0, 4]):
        pass
    with pytest.raises(ValueError, match="adapter=-2"):
        multi.activate(-2)
    with multi.mixed([0, 1]), pytest.raises(ValueError, match="selects 2 rows, but the layer got a batch of 3"):
        G.forward_logits(model, torch.tensor(PROMPTS[:1] * 3), spec.vocab_size, spec.hidden_size)
    assert getattr(model, "batch_rows", None) is None  # nothing left on the model after the block


def test_adapters_that_do_not_belong_together_are_refused(adapter_dirs, tmp_path):
    from nemo_adapt.generation.multi_lora import MultiLoRA, load_lora_adapters
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    model, source = _base()
    # Another base: the recorded fingerprint is not this base's.
    other_base = tmp_path / "other_base"
    shutil.copytree(adapter_dirs[1], other_base)
    meta = json.loads((other_base / "adapter_config.json").read_text())
    meta["base_model_fingerprint"] = "tiny_llama:0123456789abcdef"
    (other_base / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{other_base}.*trained on base model tiny_llama:0123456789abcdef"):
        load_lora_adapters([adapter_dirs[0], other_base], source)
    # Other targets.
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=["linear_qkv", "linear_fc2"])
    apply_peft(model, cfg, seed=0)
    qkv_only = _save(model, source, tmp_path / "qkv_fc2", cfg, seed=9)
    with pytest.raises(ConfigError, match=f"{qkv_only}.*peft.target_modules=.*linear_qkv', 'linear_fc2'.*same modules"):
        load_lora_adapters([adapter_dirs[0], qkv_only], source)
    # Another method.
    from nemo_adapt.peft.dora import DoRAConfig

    dora_model, _ = _base()
    dcfg = DoRAConfig(rank=4, alpha=8)
    apply_peft(dora_model, dcfg, seed=0)
    dora = _save(dora_model, source, tmp_path / "dora", dcfg, seed=10)
    with pytest.raises(ConfigError, match=f"{dora}.*a dora adapter; only LoRA"):
        load_lora_adapters([adapter_dirs[0], dora], source)
    # A live model at too small a rank for the rank-8 adapter, and a merged one.
    adapters = load_lora_adapters(adapter_dirs, source)
    small, _ = _base()
    apply_peft(small, LoRAConfig(rank=4, alpha=8), seed=0)
    with pytest.raises(ConfigError, match="has rank 4, but the largest adapter rank is 8"):
        MultiLoRA(small, adapters)
    from nemo_adapt.peft.lora import LoRA

    LoRA.merge_into_base(small)
    with pytest.raises(ConfigError, match="merged"):
        MultiLoRA(small, adapters[:3])
