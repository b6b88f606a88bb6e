"""Run directories, merged models and evaluations for the registry tests, written in a few milliseconds.

The files have the shapes `nemo-adapt run`, `nemo-adapt eval` and `nemo-adapt merge` write (adapter_config.json
as `save_adapter` writes it, eval.json with metrics, suites, forgetting, inference cost and provenance); the
tensors are small random arrays, since the registry never looks inside them. One test registers a really
trained and evaluated tiny run (tests/distributed/test_registry_tiny_run.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

BASE_FP = "tiny_llama@0123456789abcdef"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_test_file(directory: Path, text: str = "a\nb\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    test = directory / "test.jsonl"
    test.write_text(text)
    return test


def interval(value: float, low: float, high: float, n: int = 200) -> dict:
    return {"value": value, "low": low, "high": high, "n": n}


def eval_result(test: Path, weights_sha: str | None, *, em=(0.85, 0.80, 0.90), n: int = 200,
                suites: dict | None = None, forgetting=(0.2, 0.1, 0.3), latency=(90.0, 100.0),
                peak_bytes: int = 2**30, model: dict | None = None) -> dict:
    """An eval.json as `nemo-adapt eval RUN --suite ... --forgetting --latency` writes it."""
    result = {
        "label": "adapted", "exact_match": em[0], "n": n,
        "metrics": {"exact_match": interval(*em, n), "token_f1": interval(0.9, 0.85, 0.95, n),
                    "field_accuracy": {"team": interval(0.9, 0.86, 0.94, n), "priority": interval(0.8, 0.74, 0.86, n)},
                    "ci": {"method": "percentile bootstrap over examples", "level": 0.95}},
        "suites": suites if suites is not None else {
            "safety": {"name": "safety", "pass": True, "passed": 5, "checked": 5, "sha256": "5" * 64, "failed": []}},
        "provenance": {"test_file": str(test), "test_sha256": sha256(test), "metric": "exact_match",
                       "model": model or {"architecture": "tiny_llama", "fingerprint": BASE_FP},
                       "adapter": {"weights_sha256": weights_sha, "format": "nemo-adapt"} if weights_sha else None,
                       "code_version": "0.1.0+test"},
    }
    if forgetting is not None:
        result["forgetting"] = {"loss_delta": interval(*forgetting, 64), "passages": 64}
    if latency is not None:
        own, base = latency
        result["inference_cost"] = {
            "as_evaluated": {"decode_tokens_per_s": {"1": own, "8": 4 * own}, "peak_memory_bytes": peak_bytes,
                             "memory_kind": "process_peak_rss"},
            "base": {"decode_tokens_per_s": {"1": base, "8": 4 * base}, "peak_memory_bytes": peak_bytes}}
    return result


def baseline_result(test: Path, em: float = 0.1, shots: int = 2) -> dict:
    """eval_baseline.json as `nemo-adapt eval RUN --baseline` writes it."""
    return {"baseline": {"label": "baseline", "shots": shots, "n": 200, "exact_match": em,
                         "metrics": {"exact_match": interval(em, em - 0.04, em + 0.04)},
                         "provenance": {"test_file": str(test), "test_sha256": sha256(test)}},
            "baseline_0shot": {"shots": 0, "metrics": {"exact_match": interval(0.0, 0.0, 0.0)}}}


def write_adapter(directory: Path, seed: int = 0, size: int = 64) -> Path:
    """An adapter directory as `save_adapter` writes it (LoRA rank 4 on tiny_llama)."""
    from safetensors.numpy import save_file

    from nemo_adapt.peft.base import peft_config_class

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight":
               rng.standard_normal((4, size)).astype(np.float32)}, str(directory / "adapter_model.safetensors"))
    config = {"peft": asdict(peft_config_class("lora")(rank=4, alpha=8.0)), "base_model": "tiny_llama",
              "base_checkpoint": "random:tiny_llama", "base_model_fingerprint": BASE_FP,
              "data_fingerprint": "d" * 64, "run": directory.parent.name, "step": 5, "num_parameters": 4 * size,
              "num_tensors": 1}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_run(directory: Path, test: Path, seed: int = 0, *, evaluate: bool = True, baseline: bool = True,
              **eval_kwargs) -> Path:
    """A finished LoRA run directory: config.yaml, results.json, data_fingerprint.json, adapter/, and (by default)
    eval.json and eval_baseline.json of that very adapter."""
    directory.mkdir(parents=True, exist_ok=True)
    recipe = {"run": {"name": directory.name, "seed": seed, "max_steps": 5},
              "model": {"name": "tiny_llama", "checkpoint": "random:tiny_llama"},
              "data": {"train": "train.jsonl", "test": str(test)},
              "peft": {"method": "lora", "rank": 4, "alpha": 8.0, "init_from": None},
              "optim": {"lr": 0.01 * (seed + 1)},
              "logging": {"wandb_mode": "auto", "wandb_project": "registry-test"}}
    (directory / "config.yaml").write_text(yaml.safe_dump(recipe))
    (directory / "results.json").write_text(json.dumps({"step": 5, "exit_code": 0, "trainable_params": 256,
                                                        "base_model_fingerprint": BASE_FP,
                                                        "data": {"fingerprint": "d" * 64}}))
    (directory / "data_fingerprint.json").write_text(json.dumps({"fingerprint": {"train": "a" * 64, "test": "b" * 64,
                                                                                 "combined": "d" * 64}}))
    adapter = write_adapter(directory / "adapter", seed)
    if evaluate:
        weights = sha256(adapter / "adapter_model.safetensors")
        (directory / "eval.json").write_text(json.dumps(eval_result(test, weights, **eval_kwargs)))
    if baseline:
        (directory / "eval_baseline.json").write_text(json.dumps(baseline_result(test)))
    return directory


def write_merged(directory: Path, status: str, parents: list[Path] = (), seed: int = 0, files: int = 1,
                 file_bytes: int = 256) -> Path:
    """A merged model directory as `nemo-adapt merge` writes it (HF config + safetensors + merge_config.json)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    for i in range(files):
        save_file({"w": rng.standard_normal(file_bytes // 4).astype(np.float32)},
                  str(directory / f"model-{i:05d}.safetensors"))
    models = [{"model": str(p), "sha256": sha256(p / "adapter_model.safetensors"), "weight": 1.0,
               "fingerprint": f"adapter@{sha256(p / 'adapter_model.safetensors')[:16]}"} for p in parents]
    record = {"status": status, "merge_method": "linear", "parameters": {"normalize": True}, "models": models,
              "base_model": {"model": "random:tiny_llama", "fingerprint": BASE_FP}, "architecture": "tiny_llama",
              "code_version": "0.1.0+test"}
    if status in ("validated", "failed_validation"):  # what `nemo-adapt merge --validate` records
        ok = status == "validated"
        record["validation"] = [{"suite": "runs/triage", "test_split": "data/test.jsonl", "test_sha256": "0" * 64,
                                 "exact_match": 0.8 if ok else 0.5, "correct": 160 if ok else 100, "n": 200,
                                 "threshold": 0.7, "threshold_from": "0.9 x the parent's 0.78", "passed": ok}]
    (directory / "merge_config.json").write_text(json.dumps(record))
    return directory


GATES = """name: test
gates:
  - {metric: exact_match, min: 0.75}
  - {metric: exact_match, min_over_baseline: 0.05}
  - {metric: forgetting, max: 1.0}
  - {metric: latency_overhead, max: 0.25}
  - {metric: peak_memory_gib, max: 4}
  - {suites: [safety]}
  - {dataset: current}
"""


def write_gates(directory: Path, text: str = GATES, name: str = "gates.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A registry location in NEMO_ADAPT_REGISTRY, a test file, a finished run and a gates file; W&B offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NEMO_ADAPT_REGISTRY", str(tmp_path / "reg"))
    test = write_test_file(tmp_path / "data")
    return SimpleNamespace(tmp=tmp_path, test=test, reg=tmp_path / "reg",
                           run_a=write_run(tmp_path / "runs" / "triage", test, seed=0), gates=write_gates(tmp_path))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`nemo-adapt registry ARGS` in-process: (exit code, stdout, stderr)."""
    from nemo_adapt.cli import main

    code = main(["registry", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def added_id(out: str) -> str:
    """The version id `registry add` printed."""
    return re.search(r":([0-9a-f]{12}) ", out).group(1)
