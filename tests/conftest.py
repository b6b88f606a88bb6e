"""Shared fixtures: tiny checkpoints written by `transformers`, torchrun launcher, chat prompts."""

import contextlib
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


def torchrun(nproc: int, script: Path | str, *args: str, timeout: int = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `script` (a path, or `-m module`) under torchrun on CPU with `nproc` ranks.

    `--standalone` lets torchrun pick a free port; nothing uses a fixed one.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    target = ["-m", str(script)[3:]] if str(script).startswith("-m ") else [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, *args]
    proc = _run_in_own_group(cmd, full_env, timeout)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"torchrun {script} {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return proc


def _run_in_own_group(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run a command in its own process group with output in files, then end whatever it left.

    A rank killed with SIGKILL (the resume tests do that on purpose) leaves its helper processes
    (e.g. dist_checkpointing's writer manager) behind; with pipes, waiting for their EOF would hang.
    Everything in the group was started by this call, so ending the group ends only our processes.
    """
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


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


def write_tiny_chat_data(directory: Path, rows: int = 96, seed: int = 0) -> dict[str, Path]:
    """A character-level chat task for the tiny models: answer with the word upper-cased."""
    import random

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", rows), ("validation", 16), ("test", 16)):
        lines = []
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(4))
            lines.append(json.dumps({"messages": [
                {"role": "system", "content": "Upper-case the word."},
                {"role": "user", "content": word},
                {"role": "assistant", "content": word.upper()}]}))
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


def write_tiny_recipe(directory: Path, data: dict[str, Path], **sections) -> Path:
    """A recipe for `random:tiny_llama` on the tiny chat task; `sections` override whole keys."""
    import yaml

    recipe = {
        "run": {"name": "tiny", "output_dir": str(directory / "run"), "seed": 7, "max_steps": 5,
                "log_interval": 1},
        "model": {"name": "tiny_llama", "checkpoint": "random:tiny_llama"},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]), "test": str(data["test"]),
                 "seq_length": 64, "packing": True},
        "peft": {"method": "lora", "rank": 4, "alpha": 8},
        "train": {"global_batch_size": 8, "micro_batch_size": 2},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "logging": {"wandb_mode": "disabled", "loss_curve": False},
        "eval": {"enabled": False},
    }
    for key, value in sections.items():
        if key == "peft" and value.get("method", "lora") != "lora":
            recipe[key] = dict(value)  # another method: LoRA's settings would be unknown keys
        else:
            recipe[key] = {**recipe.get(key, {}), **value}
    path = directory / "recipe.yaml"
    path.write_text("# tiny_llama LoRA test recipe\n" + yaml.safe_dump(recipe))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def run_tiny(tmp_path: Path, name: str, data: dict[str, Path], env: dict, nproc: int = 1, overrides=(), check=True,
             **sections):
    """`nemo-adapt run` of the tiny recipe (`write_tiny_recipe` with `sections`) in tmp_path/name under
    torchrun with `nproc` ranks. Returns (run directory, completed process)."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    recipe = write_tiny_recipe(d, data, **sections)
    proc = torchrun(nproc, "-m nemo_adapt.cli", "run", str(recipe), *overrides, env=env, check=check)
    return d / "run", proc


@pytest.fixture
def tiny_run_dir(tmp_path, monkeypatch):
    """A run directory of the tiny chat task holding only its resolved config (nothing trained), evaluated on 6
    test examples with 5 new tokens; NEMO_ADAPT_CACHE points into tmp_path."""
    from nemo_adapt.config import load_recipe, save_resolved

    monkeypatch.setenv("NEMO_ADAPT_CACHE", str(tmp_path / "cache"))
    data = write_tiny_chat_data(tmp_path / "data")
    run = tmp_path / "run"
    save_resolved(load_recipe(write_tiny_recipe(tmp_path, data, eval={"max_new_tokens": 5, "max_examples": 6})),
                  run / "config.yaml")
    return run
