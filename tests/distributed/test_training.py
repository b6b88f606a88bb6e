"""The training engine end to end through `nemo-adapt run` on CPU over gloo (torchrun):
parallel equivalence, exact resume after SIGKILL, resume at another layout, artifacts."""


import pytest
from safetensors.torch import load_file

from tests.conftest import run_tiny as _run
from tests.conftest import train_losses

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2)}


def test_lora_losses_and_adapters_match_across_tp_pp_dp(tmp_path, tiny_data, cache_env):
    """Same global batch at TP1, TP2, PP2 and DP2: per-step losses and trained adapters within 1e-4."""
    losses, adapters = {}, {}
    for name, (tp, pp, nproc) in LAYOUTS.items():
        run_dir, _ = _run(tmp_path, name, tiny_data, cache_env, nproc, parallel={"tensor": tp, "pipeline": pp})
        losses[name] = train_losses(run_dir)
        adapters[name] = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    ref = losses["tp1"]
    assert sorted(ref) == [1, 2, 3, 4, 5]
    assert ref[5] < ref[1], "training did not reduce the loss"
    for name in LAYOUTS:
        for step, value in ref.items():
            assert abs(losses[name][step] - value) <= 1e-4, f"{name} step {step}: {losses[name][step]} vs {value}"
        assert adapters[name].keys() == adapters["tp1"].keys()
        for key, tensor in adapters["tp1"].items():
            delta = (adapters[name][key] - tensor).abs().max().item()
            assert delta <= 1e-4, f"{name}: adapter tensor {key} differs by {delta}"
    # B starts at zero; after 5 steps every up-projection has moved.
    assert all(t.abs().sum() > 0 for k, t in adapters["tp1"].items() if ".up." in k)


def test_exact_resume_after_sigkill_and_interrupted_checkpoint(tmp_path, tiny_data, cache_env):
    """10 steps straight vs. killed after the step-5 checkpoint and resumed: steps 6-10 equal (1e-6).
    A kill in the middle of writing the step-8 checkpoint leaves step 5 as the one resumed from."""
    straight, _ = _run(tmp_path, "straight", tiny_data, cache_env, run={"max_steps": 10},
                       checkpoint={"save_interval": 5})
    expected = train_losses(straight)

    sections = {"run": {"max_steps": 10}, "checkpoint": {"save_interval": 5}}
    run_dir, proc = _run(tmp_path, "killed", tiny_data, {**cache_env, "NEMO_ADAPT_FAULT": "after_checkpoint:5"},
                         check=False, **sections)
    assert proc.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"

    # Resume, but die while writing the step-8 checkpoint (save_interval 4 now: 8 is the next one).
    sections["checkpoint"] = {"save_interval": 4}
    _, proc = _run(tmp_path, "killed", tiny_data, {**cache_env, "NEMO_ADAPT_FAULT": "during_checkpoint:8"},
                   check=False, **sections)
    assert proc.returncode != 0
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert (root / ".tmp-step_00000008").exists(), "the interrupted write should be left behind, uncommitted"

    _run(tmp_path, "killed", tiny_data, cache_env, **sections)
    resumed = train_losses(run_dir)
    assert not (root / ".tmp-step_00000008").exists()
    for step in range(6, 11):
        assert abs(resumed[step] - expected[step]) <= 1e-6, f"step {step}: {resumed[step]} vs {expected[step]}"
    assert (run_dir / "restarts").read_text().strip() == "2"


@pytest.mark.parametrize("saved,resumed,peft", [
    # These two: the PEFT battery resumes every method's adapter checkpoint across TP and PP layouts, and the
    # next case runs this command-level path with a pipeline split.
    pytest.param((2, 1), (1, 1), {}, id="tp2-to-tp1", marks=pytest.mark.exhaustive),
    pytest.param((1, 2), (1, 1), {}, id="pp2-to-pp1", marks=pytest.mark.exhaustive),
    # Adapters on layers 1-3 of 0-3: the first PP stage holds one adapted layer, the second two.
    pytest.param((1, 2), (1, 1), {"layers": [1, 2, 3]}, id="pp2-to-pp1-upper-layers"),
])
def test_checkpoint_resumes_at_another_layout(tmp_path, tiny_data, cache_env, saved, resumed, peft):
    """A checkpoint saved at TP2 (PP2) resumes at TP1 with the same next-step loss (1e-4)."""
    tp, pp = saved
    straight, _ = _run(tmp_path, "straight", tiny_data, cache_env, tp * pp,
                       parallel={"tensor": tp, "pipeline": pp}, run={"max_steps": 4}, peft=peft)
    first, _ = _run(tmp_path, "moved", tiny_data, cache_env, tp * pp,
                    parallel={"tensor": tp, "pipeline": pp}, run={"max_steps": 3}, peft=peft)
    tp2, pp2 = resumed
    _run(tmp_path, "moved", tiny_data, cache_env, tp2 * pp2, parallel={"tensor": tp2, "pipeline": pp2},
         run={"max_steps": 4}, peft=peft)
    got, want = train_losses(first)[4], train_losses(straight)[4]
    assert abs(got - want) <= 1e-4, f"step 4 after moving layouts: {got} vs {want}"


def test_peft_checkpoint_holds_only_adapter_and_artifact_describes_it(tmp_path, tiny_data, cache_env):
    """A real run: adapter artifact, slim resume checkpoint, and the offline W&B run holding
    exactly the values metrics.jsonl holds, plus the resolved config."""
    import json

    from nemo_adapt.logging.wandb_offline import read_offline_run
    from tests.conftest import read_metrics

    env = {**cache_env, "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    run_dir, _ = _run(tmp_path, "art", tiny_data, env, run={"max_steps": 2},
                      logging={"wandb_mode": "offline"})
    wb = read_offline_run(run_dir)
    assert wb.config["peft"]["rank"] == 4 and wb.config["model"]["checkpoint"] == "random:tiny_llama"
    history: dict[int, dict] = {}
    for row in wb.history:
        history.setdefault(row["_step"], {}).update(row)
    logged = [m for m in read_metrics(run_dir) if "train/loss" in m or "val/loss" in m]
    assert len(logged) >= 3
    for m in logged:
        for key, value in m.items():
            if key not in ("step", "time"):
                assert history[m["step"]][key] == value, f"step {m['step']} {key}"
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft"]["method"] == "lora" and cfg["peft"]["rank"] == 4
    assert cfg["base_model"] == "tiny_llama" and cfg["base_model_fingerprint"].startswith("tiny_llama@")
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    # tiny_llama: 4 layers x 4 targets x 2 matrices.
    assert len(tensors) == 32 and cfg["num_parameters"] == sum(t.numel() for t in tensors.values())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["trainable_params"] == cfg["num_parameters"]
    # The resume checkpoint of a PEFT run holds adapter tensors and their optimizer state only.
    assert results["checkpoint_bytes"] < 4 * 4 * cfg["num_parameters"] + 2**20


def test_full_finetuning_with_distributed_optimizer_matches_and_reshards(tmp_path, tiny_data, cache_env):
    """Full fine-tuning, distributed optimizer at DP2 (Adam state sharded over the two ranks): the same
    losses as DP1 without it (1e-4), and its checkpoint resumes at DP1 with the same next-step loss."""
    full = {"method": "none"}
    straight, _ = _run(tmp_path, "dp1", tiny_data, cache_env, 1, peft=full, run={"max_steps": 4})
    sharded, _ = _run(tmp_path, "dp2", tiny_data, cache_env, 2, peft=full, run={"max_steps": 3},
                      parallel={"distributed_optimizer": True})
    want, got = train_losses(straight), train_losses(sharded)
    for step in (1, 2, 3):
        assert abs(got[step] - want[step]) <= 1e-4, f"step {step}: {got[step]} vs {want[step]}"
    assert want[3] < want[1]
    _run(tmp_path, "dp2", tiny_data, cache_env, 1, peft=full, run={"max_steps": 4},
         parallel={"distributed_optimizer": True})
    assert abs(train_losses(sharded)[4] - want[4]) <= 1e-4
