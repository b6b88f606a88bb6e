"""Shared fixtures: tiny checkpoints written by `transformers`, torchrun launcher, chat prompts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 2+2?",
]


def torchrun(nproc: int, script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` under torchrun on CPU with `nproc` ranks; --standalone picks a free port."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"torchrun {script.name} {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return proc


def write_tiny_hf_checkpoint(directory: Path, name: str = "tiny_qwen2", seed: int = 0) -> Path:
    """A random-weight Hugging Face checkpoint of a registered tiny spec, written by transformers."""
    import transformers

    from nemo_adapt.models.hf import hf_config_from_spec
    from nemo_adapt.models.spec import get_model_spec

    spec = get_model_spec(name)
    cfg_dict = hf_config_from_spec(spec)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Norm weights start at 1 and biases at 0 in transformers; randomise them so a mix-up shows.
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_hf"))


@pytest.fixture(scope="session")
def smollm2_chat_prompts() -> list[list[int]]:
    from nemo_adapt.models.embedded import embedded_gguf_path
    from nemo_adapt.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_gguf_path())
    out = []
    for q in CHAT_QUESTIONS:
        enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)
        out.append(list(enc["input_ids"]))
    return out


def dump_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path
