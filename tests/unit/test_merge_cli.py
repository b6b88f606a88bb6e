"""`nemo-adapt merge MERGE.yaml` on tiny Hugging Face checkpoints written by `transformers`: results, lineage,
streaming, and bad input refused before anything is written."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nemo_adapt.cli import main
from tests.conftest import write_tiny_hf_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_ckpts")
    return {name: write_tiny_hf_checkpoint(root / name, seed=seed) for name, seed in (("base", 0), ("a", 1), ("b", 2))}


def _write(tmp_path: Path, body: dict, name: str = "merge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_linear_merge_of_identical_models_returns_the_model_and_transformers_loads_it(tmp_path, ckpts, capsys):
    out = tmp_path / "out"
    cfg = _write(tmp_path, {"merge_method": "linear", "models": [{"model": str(ckpts["a"]), "weight": 0.3},
                                                                 {"model": str(ckpts["a"]), "weight": 0.7}],
                            "dtype": "float32", "out": str(out)})
    assert main(["merge", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert "status unvalidated" in captured.out
    # Not a terminal: progress comes as whole lines, the last one the total.
    progress = captured.err.splitlines()
    assert "\r" not in captured.err and progress and progress[-1].startswith("merge: ")
    total = progress[-1].split()[1]
    assert total.split("/")[0] == total.split("/")[1]
    merged, a = _weights(out), _weights(ckpts["a"])
    assert merged.keys() == a.keys()
    for k in a:
        assert torch.allclose(merged[k], a[k], atol=1e-6), k
    lineage = json.loads((out / "merge_config.json").read_text())
    assert lineage["status"] == "unvalidated" and lineage["merge_method"] == "linear"
    assert [m["weight"] for m in lineage["models"]] == [0.3, 0.7]
    assert lineage["models"][0]["fingerprint"] == lineage["models"][1]["fingerprint"]
    assert lineage["base_model"] is None and lineage["code_version"]

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(ckpts["a"]), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 9]])
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_task_arithmetic_and_ties_equal_the_method_applied_tensor_by_tensor(tmp_path, ckpts):
    from nemo_adapt.merge import MergeParams, get_merge_method

    base, a, b = (_weights(ckpts[k]) for k in ("base", "a", "b"))
    zero = tmp_path / "zero"
    cfg = _write(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(ckpts["base"]),
                            "models": [str(ckpts["a"]), str(ckpts["b"])], "parameters": {"lambda": 0.0},
                            "dtype": "float32", "out": str(zero)}, "zero.yaml")
    assert main(["merge", str(cfg)]) == 0
    for k, v in _weights(zero).items():
        assert torch.equal(v, base[k]), k  # lambda 0 returns the base

    ties = tmp_path / "ties"
    cfg = _write(tmp_path, {"merge_method": "ties", "base_model": str(ckpts["base"]),
                            "models": [{"model": str(ckpts["a"]), "density": 0.5},
                                       {"model": str(ckpts["b"]), "weight": 0.5, "density": 0.3}],
                            "parameters": {"lambda": 0.8}, "dtype": "bfloat16", "out": str(ties)}, "ties.yaml")
    assert main(["merge", str(cfg)]) == 0
    fn = get_merge_method("ties").fn
    got = _weights(ties)
    for k in base:
        want = fn(base[k], [a[k], b[k]], [1.0, 0.5], [0.5, 0.3], MergeParams(lambda_=0.8)).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want), k
    assert json.loads((ties / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("body,match", [
    ({"merge_method": "tie", "models": ["A"], "out": "o"}, r"merge_method='tie' is not a registered merge method. "
                                                           r"Did you mean 'ties'\?"),
    ({"merge_method": "ties", "models": ["A"], "out": "o"}, r"merge_method=ties works on task vectors .* set base_model"),
    ({"merge_method": "slerp", "models": ["A"], "out": "o"}, r"slerp merges exactly 2 models, `models` lists 1"),
    ({"merge_method": "linear", "models": [{"model": "A", "wieght": 1}], "out": "o"},
     r"models\[0\]: unknown key 'wieght'. Did you mean 'weight'\?"),
    ({"merge_method": "linear", "models": [{"model": "A", "density": 1.5}], "out": "o"}, r"density=1.5 must be in \(0, 1\]"),
    ({"merge_method": "linear", "models": ["A"], "parameters": {"lamda": 1}, "out": "o"},
     r"parameters: unknown key 'lamda'. Did you mean 'lambda'\?"),
    ({"merge_method": "linear", "models": ["A"], "dtype": "fp8", "out": "o"}, r"dtype='fp8'; allowed: float32"),
    ({"merge_method": "linear", "models": []}, r"`models` must be a non-empty list"),
    ({"merge_method": "linear", "models": [{"model": "A", "weight": 1.0}, {"model": "B", "weight": -1.0}], "out": "o"},
     r"merge_method=linear: the weights \[1.0, -1.0\] sum to 0, and parameters.normalize=true divides by that sum; "
     r"set normalize: false"),
    ({"merge_method": "slerp", "models": ["A", "B"], "parameters": {"t": 5}, "out": "o"},
     r"merge_method=slerp: parameters.t=5 must be in \[0, 1\]"),
    ({"merge_method": "slerp", "models": ["A", "B"], "parameters": {"t": "half"}, "out": "o"},
     r"parameters: t='half' must be a finite number"),
    ({"merge_method": "dare_linear", "base_model": "A", "models": ["A"], "parameters": {"seed": -3}, "out": "o"},
     r"parameters: seed=-3 must be an integer >= 0"),
    ({"merge_method": "linear", "models": ["missing/adapter"], "out": "o"},
     r"models\[0\].model='missing/adapter' does not exist; give a checkpoint"),
])
def test_bad_merge_files_are_refused_naming_the_key(tmp_path, body, match, capsys):
    cfg = _write(tmp_path, body)
    assert main(["merge", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_parents_that_do_not_match_are_refused_before_anything_is_written(tmp_path, ckpts, capsys):
    llama = write_tiny_hf_checkpoint(tmp_path / "llama", name="tiny_llama")
    out = tmp_path / "out"
    cfg = _write(tmp_path, {"merge_method": "linear", "models": [str(ckpts["a"]), str(llama)], "out": str(out)})
    assert main(["merge", str(cfg)]) == 2
    assert "does not match" in capsys.readouterr().err
    # A tensor missing from one parent.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpts["b"] / "config.json").read_text())
    from safetensors.torch import save_file

    w = _weights(ckpts["b"])
    w.pop(sorted(w)[0])
    save_file(w, str(broken / "model.safetensors"))
    cfg = _write(tmp_path, {"merge_method": "linear", "models": [str(ckpts["a"]), str(broken)], "out": str(out)})
    assert main(["merge", str(cfg)]) == 2
    assert "lacks tensor" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("merge_method: linear\nmodels: [a, b\nout: o\n")
    assert main(["merge", str(cfg)]) == 2
    assert f"{cfg}:" in capsys.readouterr().err
