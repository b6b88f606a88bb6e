"""Merge methods on small tensors, against values worked out by hand in each test."""

import math

import pytest
import torch

from nemo_adapt.errors import ConfigError
from nemo_adapt.merge import MergeParams, get_merge_method, list_merge_methods


def run(name, base, tensors, weights=None, densities=None, **params):
    m = get_merge_method(name)
    n = len(tensors)
    return m.fn(None if base is None else torch.tensor(base), [torch.tensor(t) for t in tensors],
                weights or [1.0] * n, densities or [1.0] * n, MergeParams(**params))


def test_registry_lists_every_method_once_and_suggests_the_closest():
    assert list_merge_methods() == ["dare_linear", "dare_ties", "linear", "slerp", "task_arithmetic", "ties"]
    with pytest.raises(ConfigError, match=r"merge_method='tie' is not a registered merge method. Did you mean 'ties'\?"):
        get_merge_method("tie")
    assert get_merge_method("slerp").num_models == 2 and not get_merge_method("linear").needs_base


def test_linear():
    # (1*[1, 2] + 3*[5, 6]) / 4 = [16/4, 20/4] = [4, 5]; unnormalised: [16, 20].
    assert run("linear", None, [[1.0, 2.0], [5.0, 6.0]], [1.0, 3.0]).tolist() == [4.0, 5.0]
    assert run("linear", None, [[1.0, 2.0], [5.0, 6.0]], [1.0, 3.0], normalize=False).tolist() == [16.0, 20.0]
    # Identical models return the model.
    same = [[0.3, -1.25, 7.0]] * 3
    assert torch.equal(run("linear", None, same, [0.2, 0.5, 0.3]), torch.tensor(same[0]))


def test_task_arithmetic():
    base = [1.0, 1.0, 1.0]
    # deltas [1, -1, 0] and [2, 0, -2]; 0.5*[1,-1,0] + 1*[2,0,-2] = [2.5, -0.5, -2]; lambda 2 -> [5, -1, -4].
    out = run("task_arithmetic", base, [[2.0, 0.0, 1.0], [3.0, 1.0, -1.0]], [0.5, 1.0], lambda_=2.0)
    assert out.tolist() == [6.0, 0.0, -3.0]
    # lambda 0 returns the base.
    assert run("task_arithmetic", base, [[9.0, 9.0, 9.0]], lambda_=0.0).tolist() == base


def test_ties_trims_elects_and_merges_the_agreeing():
    base = [0.0, 0.0, 0.0, 0.0]
    a = [3.0, -1.0, 0.5, 2.0]
    b = [-1.0, -2.0, 4.0, 1.0]
    # density 0.5 keeps the 2 largest magnitudes: a -> [3, 0, 0, 2]; b -> [0, -2, 4, 0].
    # Elected signs (weights 1): sums [3, -2, 4, 2] -> [+, -, +, +]; every kept entry agrees.
    # Normalised disjoint mean: [3/1, -2/1, 4/1, 2/1].
    out = run("ties", base, [a, b], densities=[0.5, 0.5])
    assert out.tolist() == [3.0, -2.0, 4.0, 2.0]
    # Full density: a + b signs: sums [2, -3, 4.5, 3] -> [+, -, +, +].
    # entry 0: only a (3) agrees -> 3; entry 1: both -> (-1-2)/2 = -1.5; entry 2: (0.5+4)/2 = 2.25; entry 3: 1.5.
    assert run("ties", base, [a, b]).tolist() == [3.0, -1.5, 2.25, 1.5]
    # Unnormalised, lambda 0.5: entry 0: 3*0.5 = 1.5; 1: -3*0.5; 2: 4.5*0.5; 3: 3*0.5.
    assert run("ties", base, [a, b], normalize=False, lambda_=0.5).tolist() == [1.5, -1.5, 2.25, 1.5]


def test_dare_is_deterministic_for_a_seed_and_rescales_what_it_keeps():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(1000)
    a = (torch.rand(1000, generator=g) + 0.5).tolist()  # all positive, in [0.5, 1.5)
    one = run("dare_linear", base.tolist(), [a], densities=[0.25], seed=7)
    again = run("dare_linear", base.tolist(), [a], densities=[0.25], seed=7)
    other = run("dare_linear", base.tolist(), [a], densities=[0.25], seed=8)
    assert torch.equal(one, again) and not torch.equal(one, other)
    kept = one != 0
    # Kept entries are the original divided by the density (x4), the rest are zero; about a quarter kept.
    assert torch.allclose(one[kept], torch.tensor(a)[kept] * 4)
    assert 200 < int(kept.sum()) < 300
    # Density 1 drops nothing: DARE-linear is then task arithmetic.
    assert torch.equal(run("dare_linear", [1.0, 1.0], [[2.0, 3.0]], densities=[1.0]),
                       run("task_arithmetic", [1.0, 1.0], [[2.0, 3.0]]))
    assert torch.equal(run("dare_ties", [0.0, 0.0], [[1.0, -1.0], [3.0, 1.0]], densities=[1.0, 1.0]),
                       run("ties", [0.0, 0.0], [[1.0, -1.0], [3.0, 1.0]]))
    assert torch.equal(run("dare_ties", base.tolist(), [a, a], densities=[0.5, 0.5], seed=3),
                       run("dare_ties", base.tolist(), [a, a], densities=[0.5, 0.5], seed=3))


def test_slerp():
    # Orthogonal unit vectors, t = 0.5: theta = pi/2, both coefficients sin(pi/4)/1 = 0.7071.
    out = run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # t = 0 and t = 1 give the endpoints; t = 1/3 on the quarter circle is at 30 degrees.
    assert torch.allclose(run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=0.0), torch.tensor([1.0, 0.0]))
    assert torch.allclose(run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=1.0), torch.tensor([0.0, 1.0]), atol=1e-7)
    assert torch.allclose(run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=1 / 3),
                          torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # Parallel tensors: linear interpolation (2 and 4 -> 3 at t = 0.5).
    assert run("slerp", None, [[2.0, 2.0], [4.0, 4.0]], t=0.5).tolist() == [3.0, 3.0]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 0.5, 0.999, 1.0])
def test_blockwise_magnitude_trim_keeps_the_entries_trim_to_density_keeps(density):
    """MagnitudeTrim over row blocks (a radix select on the float bits) = ties.trim_to_density on the whole tensor,
    including equal magnitudes (kept by position, earlier first) that straddle the threshold and blocks."""
    from nemo_adapt.merge.methods import MagnitudeTrim
    from nemo_adapt.merge.methods.ties import trim_to_density

    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(37, 11, generator=gen)
    delta[5:30, 2] = 0.25  # many equal magnitudes, with both signs, across blocks
    delta[7:20, 4] = -0.25
    delta[0, 0] = -0.0
    blocks = [(a, min(a + 4, 37)) for a in range(0, 37, 4)]
    trim = MagnitudeTrim(lambda: (delta[a:b] for a, b in blocks), delta.numel(), density)
    got = torch.cat([trim.apply(delta[a:b]) for a, b in blocks])
    assert torch.equal(got, trim_to_density(delta, density))


def test_merge_runs_ties_block_by_block_and_equals_the_whole_tensor_function(tmp_path, monkeypatch):
    """`nemo-adapt merge` with 64 KiB blocks (every tensor several blocks): TIES and DARE-TIES outputs equal the
    methods applied to whole tensors (TIES within float32 rounding of base + trimmed delta; DARE draws per block,
    so only its determinism is compared)."""
    import json

    from safetensors.torch import load_file

    import nemo_adapt.merge.cli as merge_cli
    from nemo_adapt.cli import main
    from nemo_adapt.merge.methods.ties import ties
    from tests.conftest import write_tiny_hf_checkpoint

    monkeypatch.setattr(merge_cli, "BLOCK_BYTES", 64 * 1024)
    dirs = [write_tiny_hf_checkpoint(tmp_path / f"m{i}", name="tiny_llama", seed=i) for i in range(3)]
    spec = {"merge_method": "ties", "base_model": str(dirs[0]), "dtype": "float32",
            "models": [{"model": str(dirs[1]), "density": 0.3, "weight": 1.0},
                       {"model": str(dirs[2]), "density": 0.6, "weight": 0.5}], "out": str(tmp_path / "out")}
    (tmp_path / "m.yaml").write_text(json.dumps(spec))
    assert main(["merge", str(tmp_path / "m.yaml")]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    base, a, b = (load_file(str(d / "model.safetensors")) for d in dirs)
    worst = max((got[k] - ties(base[k], [a[k], b[k]], [1.0, 0.5], [0.3, 0.6], MergeParams())).abs().max().item()
                for k in got)
    assert worst <= 1e-6
    for run in ("dare1", "dare2"):
        (tmp_path / f"{run}.yaml").write_text(json.dumps({**spec, "merge_method": "dare_ties",
                                                          "out": str(tmp_path / run)}))
        assert main(["merge", str(tmp_path / f"{run}.yaml")]) == 0
    d1, d2 = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("dare1", "dare2"))
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
