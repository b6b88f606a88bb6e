"""Every cache is keyed on content and on the versions of the code that produced it, and an entry edited after
it was written is detected and rebuilt: the GGUF tokenizer conversion, the tokenized-data cache, random
checkpoints."""

import dataclasses
import importlib.metadata
import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from nemo_adapt import cache
from nemo_adapt.data import fingerprint as fpr


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_reported", set())


def fake_version(monkeypatch, package: str, version: str) -> None:
    """Pretend `package` is installed at `version` (what a new release looks like to the cache keys)."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == package else real(name))


def write_gguf(path: Path, template: str = "T1", tensor_value: float = 0.0) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.chat_template", template)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("x", np.full(8, tensor_value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- the GGUF tokenizer conversion ------------------------------------------------------------------


@pytest.fixture
def conversions(monkeypatch):
    """Replace the transformers conversion (seconds per GGUF) by saving the character tokenizer; count calls."""
    import nemo_adapt.tokenizer as tokenizer_module
    from nemo_adapt.models.random_init import char_tokenizer

    calls = []

    def convert(gguf_path, out):
        calls.append(gguf_path)
        char_tokenizer().save_pretrained(str(out))

    monkeypatch.setattr(tokenizer_module, "_convert_gguf", convert)
    return calls


def tokenizer_entries() -> list[Path]:
    root = cache.cache_dir() / "tokenizers"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_tokenizer_cache_is_reused_then_rebuilt_after_its_template_is_edited(tmp_path, conversions, capsys):
    from nemo_adapt.models.random_init import CHAT_TEMPLATE
    from nemo_adapt.tokenizer import load_tokenizer

    gguf_path = write_gguf(tmp_path / "m.gguf")
    assert load_tokenizer(gguf_path).chat_template == CHAT_TEMPLATE
    assert load_tokenizer(gguf_path).chat_template == CHAT_TEMPLATE
    assert len(conversions) == 1
    [entry] = tokenizer_entries()
    template = entry / "chat_template.jinja"
    assert template.read_text() == CHAT_TEMPLATE

    template.write_text("{{ 'edited' }}")
    tok = load_tokenizer(gguf_path)
    assert tok.chat_template == CHAT_TEMPLATE  # not the edited template
    assert len(conversions) == 2
    err = capsys.readouterr().err
    assert "chat_template.jinja was changed after it was written; rebuilding it" in err
    assert template.read_text() == CHAT_TEMPLATE
    load_tokenizer(gguf_path)
    assert len(conversions) == 2 and capsys.readouterr().err == ""


def test_tokenizer_cache_misses_when_a_converting_library_changes_version(tmp_path, conversions, monkeypatch):
    from nemo_adapt.tokenizer import load_tokenizer

    gguf_path = write_gguf(tmp_path / "m.gguf")
    load_tokenizer(gguf_path)
    for package in ("transformers", "tokenizers", "gguf"):
        with monkeypatch.context() as m:
            fake_version(m, package, "999.0")
            load_tokenizer(gguf_path)
    assert len(conversions) == 4
    assert len(tokenizer_entries()) == 4
    load_tokenizer(gguf_path)  # the original versions' entry is still there
    assert len(conversions) == 4


def test_tokenizer_cache_misses_when_the_gguf_metadata_changes_with_the_same_size_and_mtime(tmp_path, conversions):
    from nemo_adapt.tokenizer import load_tokenizer

    gguf_path = write_gguf(tmp_path / "m.gguf", template="T1")
    load_tokenizer(gguf_path)
    st = gguf_path.stat()
    write_gguf(gguf_path, template="T2")  # another chat template, same length
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert gguf_path.stat().st_size == st.st_size and gguf_path.stat().st_mtime_ns == st.st_mtime_ns
    load_tokenizer(gguf_path)
    assert len(conversions) == 2


def test_gguf_metadata_digest_covers_the_header_not_the_tensor_data(tmp_path):
    import gguf

    from nemo_adapt.tokenizer import _gguf_header_end, gguf_metadata_sha256

    a = write_gguf(tmp_path / "a.gguf", tensor_value=0.0)
    b = write_gguf(tmp_path / "b.gguf", tensor_value=1.0)
    c = write_gguf(tmp_path / "c.gguf", template="T2")
    assert a.read_bytes() != b.read_bytes()
    assert gguf_metadata_sha256(a) == gguf_metadata_sha256(b)
    assert gguf_metadata_sha256(a) != gguf_metadata_sha256(c)
    reader = gguf.GGUFReader(str(a))
    with open(a, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        end = _gguf_header_end(m)
    # The tensor data starts at the next alignment boundary after the header.
    alignment = 32
    assert end <= reader.data_offset < end + alignment


# --- the tokenized-data cache -------------------------------------------------------------------------


FP = "ab" * 32
ARRAYS = {"tokens": np.arange(10, dtype=np.int32), "labels": np.arange(10, dtype=np.int32) * 2}


def test_dataset_cache_hit_then_miss_after_a_library_version_change(tmp_path, monkeypatch, capsys):
    entry = fpr.cache_file(tmp_path, FP)
    fpr.save_cache(entry, ARRAYS, {"fingerprint": FP, "stats": {"rows": 1}})
    hit = fpr.load_cache(fpr.cache_file(tmp_path, FP), FP)
    assert hit is not None and np.array_equal(hit[0]["tokens"], ARRAYS["tokens"]) and hit[1]["stats"] == {"rows": 1}
    for package in ("transformers", "tokenizers"):
        with monkeypatch.context() as m:
            fake_version(m, package, "999.0")
            m.setattr(cache, "_reported", set())
            assert fpr.cache_file(tmp_path, FP) != entry  # another entry name: a miss, rebuilt beside the old one
            assert fpr.load_cache(entry, FP) is None  # and the old entry itself is refused
            assert "made by other code or library versions" in capsys.readouterr().err
    assert fpr.load_cache(entry, FP) is not None


def test_dataset_cache_misses_when_the_pipeline_code_changes(tmp_path, monkeypatch):
    entry = fpr.cache_file(tmp_path, FP)
    fpr.save_cache(entry, ARRAYS, {"fingerprint": FP, "stats": {}})
    with monkeypatch.context() as m:
        m.setattr(fpr, "PIPELINE_VERSION", fpr.PIPELINE_VERSION + 1)
        assert fpr.cache_file(tmp_path, FP) != entry and fpr.load_cache(entry, FP) is None
    real = cache.source_digest
    with monkeypatch.context() as m:
        m.setattr(fpr, "source_digest", lambda *modules: real(*modules) + "-edited")
        assert fpr.cache_file(tmp_path, FP) != entry and fpr.load_cache(entry, FP) is None
    assert fpr.load_cache(entry, FP) is not None
    assert set(fpr.CODE_MODULES) >= {"nemo_adapt.data.tokenize", "nemo_adapt.data.packing", "nemo_adapt.data.formats"}


def test_dataset_cache_edited_after_writing_is_rebuilt_and_said_once(tmp_path, capsys):
    entry = fpr.cache_file(tmp_path, FP)
    fpr.save_cache(entry, ARRAYS, {"fingerprint": FP, "stats": {}})
    blob = bytearray(entry.read_bytes())
    blob[-1] ^= 0x01  # the last byte belongs to the last array's data; the header still parses
    entry.write_bytes(bytes(blob))
    assert fpr.load_cache(entry, FP) is None
    assert fpr.load_cache(entry, FP) is None
    err = capsys.readouterr().err
    assert err.count("was changed after it was written") == 1 and "rebuilding it" in err


def test_build_datasets_retokenizes_after_a_tokenizers_release(tmp_path, monkeypatch):
    from nemo_adapt.config.schema import DataConfig
    from nemo_adapt.data import build_datasets
    from nemo_adapt.models.random_init import char_tokenizer

    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"ok {i}"}]}
            for i in range(6)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=str(train), seq_length=64, cache_dir=str(tmp_path / "ds"))
    tok = char_tokenizer()
    first = build_datasets(cfg, tok, seed=0)
    assert not first.train.cache_hit
    again = build_datasets(cfg, tok, seed=0)
    assert again.train.cache_hit
    fake_version(monkeypatch, "tokenizers", "999.0")
    after = build_datasets(cfg, tok, seed=0)
    assert not after.train.cache_hit
    assert after.train.cache_path != first.train.cache_path
    # The data fingerprint (the data's identity, recorded with a run) is unchanged; only the cache entry moved.
    assert after.fingerprint == first.fingerprint


# --- random checkpoints -------------------------------------------------------------------------------


def test_random_checkpoint_is_reused_then_rebuilt_after_an_edit(capsys):
    from nemo_adapt.models.random_init import random_checkpoint

    entry = random_checkpoint("tiny_llama")
    config = (entry / "config.json").read_text()
    manifest = (entry / cache.MANIFEST).stat().st_mtime_ns
    assert random_checkpoint("tiny_llama") == entry
    assert (entry / cache.MANIFEST).stat().st_mtime_ns == manifest  # reused, not rewritten

    edited = json.loads(config)
    edited["rope_theta"] = 1.0
    (entry / "config.json").write_text(json.dumps(edited))
    assert random_checkpoint("tiny_llama") == entry
    assert (entry / "config.json").read_text() == config
    assert "config.json was changed after it was written; rebuilding it" in capsys.readouterr().err


def test_random_checkpoint_misses_after_a_version_or_registry_change(monkeypatch):
    import nemo_adapt.models.spec as spec_module
    from nemo_adapt.models.random_init import random_checkpoint

    entry = random_checkpoint("tiny_llama")
    with monkeypatch.context() as m:
        fake_version(m, "transformers", "999.0")
        newer = random_checkpoint("tiny_llama")
    assert newer != entry and (newer / "config.json").is_file()

    real = spec_module.get_model_spec
    monkeypatch.setattr(spec_module, "get_model_spec",
                        lambda name: dataclasses.replace(real(name), rope_theta=real(name).rope_theta * 2))
    changed = random_checkpoint("tiny_llama")
    assert changed not in (entry, newer)
    written = json.loads((changed / "config.json").read_text())
    rope_theta = written["rope_theta"] if "rope_theta" in written else written["rope_parameters"]["rope_theta"]
    assert rope_theta == real("tiny_llama").rope_theta * 2
