"""Forgetting: per-passage text losses equal `transformers`' on the same checkpoint; the paired delta by hand;
the held-out corpus loads with errors that name file and line."""

import json

import pytest
import torch

from nemo_adapt.data.general_corpus import DEFAULT, load
from nemo_adapt.errors import ConfigError
from nemo_adapt.eval.forgetting import forgetting, text_losses

pytestmark = pytest.mark.megatron


def test_shipped_corpus_names_its_source():
    first = json.loads(DEFAULT.read_text().splitlines()[0])
    assert first["licence"] == "PSF License 2.0" and "pydoc_data/topics.py" in first["source"]
    texts = load()
    assert len(texts) == 64 and all(300 <= len(t) <= 1200 for t in texts)


def test_text_losses_equal_transformers(tmp_path, monkeypatch):
    import transformers

    from nemo_adapt.models.loader import load_model, resolve_path
    from nemo_adapt.parallel import runtime
    from nemo_adapt.tokenizer import load_tokenizer

    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    base = resolve_path("random:tiny_llama")
    texts = load()[:5]
    runtime.initialize(runtime.ParallelLayout(), seed=0)
    try:
        model, source = load_model(str(base))
        tok = load_tokenizer(source.tokenizer_path)
        ours = text_losses(model, tok, source.spec, texts, batch_size=2)  # padded batches
    finally:
        runtime.shutdown()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    for text, loss in zip(texts, ours):
        ids = torch.tensor([tok(text)["input_ids"][:256]])
        with torch.no_grad():
            theirs = hf(ids, labels=ids).loss.item()
        assert abs(loss - theirs) < 1e-4, (loss, theirs)


def test_paired_delta_by_hand():
    f = forgetting([2.0, 3.0, 4.5], [2.0, 2.5, 4.0])
    # differences 0, 0.5, 0.5 -> mean 1/3
    assert f["loss_delta"]["value"] == pytest.approx(1 / 3) and f["passages"] == 3
    assert f["adapted_loss"] == pytest.approx(3.1666667) and f["base_loss"] == pytest.approx(2.8333333)
    assert 0 <= f["loss_delta"]["low"] <= f["loss_delta"]["value"] <= f["loss_delta"]["high"] <= 0.5
    with pytest.raises(ValueError, match="2 adapted and 1 base"):
        forgetting([1.0, 2.0], [1.0])


def test_bad_corpus_files(tmp_path):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"g.jsonl:2: not valid JSON"):
        load(bad)
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"source": "x"}\n')
    with pytest.raises(ConfigError, match="no passages"):
        load(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.jsonl")
    txt = tmp_path / "t.txt"
    txt.write_text("one paragraph\nstill one\n\nanother\n")
    assert load(txt) == ["one paragraph\nstill one", "another"]
