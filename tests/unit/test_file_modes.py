"""Files and directories nemo-adapt writes take their modes from the umask, like any ordinary file creation:
exported Hugging Face directories, adapter artifacts, merges, HF PEFT exports, checkpoints' staging, caches."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nemo_adapt.cli import main
from nemo_adapt.file_modes import current_umask, follow_umask
from tests.conftest import write_tiny_hf_checkpoint

# umask -> (file mode, directory mode) an ordinary open()/mkdir() gives.
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("modes_hf") / "tiny_qwen2", seed=1)


def modes(root: Path) -> dict[str, int]:
    """Relative path -> permission bits, the root itself included as '.'."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = stat.S_IMODE(p.stat().st_mode)
    return out


def assert_umask_modes(root: Path, mask: int) -> None:
    file_mode, dir_mode = MODES[mask]
    got = modes(root)
    want = {name: dir_mode if (root / name).is_dir() else file_mode for name in got}
    assert got == want
    assert any((root / name).is_file() and name.endswith(".safetensors") for name in got)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_follow_umask_fixes_owner_only_files_and_directories(tmp_path, umask):
    import tempfile

    d = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as mkdtemp makes it
    fd, f = tempfile.mkstemp(dir=d)  # 0600
    os.close(fd)
    (d / "sub").mkdir(mode=0o700)
    (d / "sub" / "x.bin").write_bytes(b"x")
    os.chmod(d / "sub" / "x.bin", 0o600)
    follow_umask(d)
    assert_modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (d, Path(f), d / "sub", d / "sub" / "x.bin")}
    file_mode, dir_mode = MODES[umask]
    assert assert_modes == {d: dir_mode, Path(f): file_mode, d / "sub": dir_mode, d / "sub" / "x.bin": file_mode}


def test_merge_output_follows_the_umask(tmp_path, hf_dir, umask):
    out = tmp_path / "merged"
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(hf_dir), str(hf_dir)],
                                   "dtype": "float32", "out": str(out)}))
    assert main(["merge", str(cfg)]) == 0
    assert_umask_modes(out, umask)


@pytest.mark.megatron
def test_hf_export_adapter_and_peft_export_follow_the_umask(tmp_path, hf_dir, umask):
    from nemo_adapt.artifacts.adapter import save_adapter
    from nemo_adapt.models.loader import base_fingerprint, load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig

    exported = tmp_path / "hf_export"
    assert main(["export", str(exported), "--checkpoint", str(hf_dir)]) == 0
    assert_umask_modes(exported, umask)

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    source = open_source(str(hf_dir))
    model, source = load_model(source)
    cfg = LoRAConfig(rank=4, alpha=8)
    apply_peft(model, cfg, seed=0)
    artifact = tmp_path / "adapter"
    save_adapter(model, artifact, cfg, {"base_model": source.spec.name, "base_checkpoint": str(hf_dir),
                                        "base_model_fingerprint": base_fingerprint(source)})
    assert_umask_modes(artifact, umask)

    peft_out = tmp_path / "peft"
    assert main(["export", str(peft_out), "--adapter", str(artifact), "--format", "peft"]) == 0
    assert_umask_modes(peft_out, umask)


def test_random_checkpoint_cache_follows_the_umask(tmp_path, monkeypatch, umask):
    from nemo_adapt.models.random_init import random_checkpoint

    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    entry = random_checkpoint("tiny_llama")
    assert_umask_modes(entry, umask)


def test_dataset_cache_file_follows_the_umask(tmp_path, umask):
    from nemo_adapt.data import fingerprint as fpr

    entry = fpr.cache_file(tmp_path, "f" * 64)
    fpr.save_cache(entry, {"tokens": np.arange(6, dtype=np.int32)}, {"fingerprint": "f" * 64, "stats": {}})
    assert stat.S_IMODE(entry.stat().st_mode) == MODES[umask][0]


def test_checkpoint_directory_follows_the_umask(tmp_path, umask):
    """The trainer's checkpoint writer publishes its staging directory through follow_umask; a safetensors
    file (owner-only as written) in such a directory ends up with the umask's mode."""
    from safetensors.torch import save_file

    staging = tmp_path / ".tmp-step_00000001"
    (staging / "rng").mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(staging / "rng" / "rank_00000.safetensors"))
    follow_umask(staging)
    assert_umask_modes(staging, umask)
