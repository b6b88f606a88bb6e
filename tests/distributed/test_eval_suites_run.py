"""A regression suite catches a damaging adapter: a LoRA trained at a huge learning rate fails a suite the base
passes, and a harmless one (a learning rate that moves nothing) passes it; `eval` exits 1 on a failed suite.
Forgetting is measured beside it: the damaged adapter's general-text loss moves beyond its interval, the harmless
one's not at all. (The random tiny base predicts text at the uniform ln 256 = 5.545 nats/token, so there is nothing
general for it to lose and the sign is not asserted here; README reports the measure on SmolLM2.)"""

import hashlib
import json

import pytest

from nemo_adapt.cli import main
from tests.conftest import run_tiny

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

SUITE = """# The tiny chat task's own behaviour, pinned to the base model's answers.
name: tiny_behaviour
max_new_tokens: 6
cases:
""" + "".join(f"  - {{id: w{i}, prompt: '{w}', expect: {{same_as_base: true}}}}\n"
              for i, w in enumerate(["abcd", "hgfe", "aabb", "cdef", "bead", "face"]))


def test_a_damaging_adapter_fails_the_suite_the_base_passes(tmp_path, tiny_data, cache_env, capsys, monkeypatch):
    suite = tmp_path / "tiny_behaviour.yaml"
    suite.write_text(SUITE)
    steps = {"run": {"max_steps": 3}}
    damaged, _ = run_tiny(tmp_path, "huge_lr", tiny_data, cache_env, optim={"lr": 1.0, "schedule": "constant"},
                          **steps)
    harmless, _ = run_tiny(tmp_path, "tiny_lr", tiny_data, cache_env, optim={"lr": 1e-12, "schedule": "constant"},
                           **steps)

    monkeypatch.setenv("NEMO_ADAPT_CACHE", cache_env["NEMO_ADAPT_CACHE"])

    def evaluate(run_dir, *extra):  # in this process: (exit code, stdout)
        code = main(["eval", str(run_dir), "--max-examples", "2", "--suite", str(suite), *extra])
        return code, capsys.readouterr().out

    code, _ = evaluate(damaged, "--baseline")
    assert code == 0
    scored = json.loads((damaged / "eval_baseline.json").read_text())["baseline"]["suites"]["tiny_behaviour"]
    assert scored["pass"] and scored["checked"] == 6

    code, out = evaluate(damaged, "--forgetting")
    assert code == 1
    result = json.loads((damaged / "eval.json").read_text())["suites"]["tiny_behaviour"]
    assert not result["pass"] and result["failed"] and all(f["failed"] == ["same_as_base"] for f in result["failed"])
    assert "suite tiny_behaviour" in out and "FAIL" in out
    forgot = json.loads((damaged / "eval.json").read_text())["forgetting"]
    delta = forgot["loss_delta"]
    assert forgot["passages"] == 64 and (delta["low"] > 0 or delta["high"] < 0), forgot  # moved, beyond the noise
    assert "forgetting: general-text loss" in out
    assert result["sha256"] == scored["sha256"] == hashlib.sha256(suite.read_bytes()).hexdigest()

    code, _ = evaluate(harmless, "--forgetting")
    assert code == 0
    result = json.loads((harmless / "eval.json").read_text())
    assert result["suites"]["tiny_behaviour"]["passed"] == 6
    assert abs(result["forgetting"]["loss_delta"]["value"]) < 1e-5
