"""Learning-rate schedules (`optim.schedule`): warmup, then cosine, linear, constant or wsd."""

import math

import pytest

from nemo_adapt.config.schema import OptimConfig, RecipeConfig
from nemo_adapt.errors import ConfigError
from nemo_adapt.training.engine import lr_at


def recipe(**optim) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.optim = OptimConfig(**{"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 4, **optim})
    return cfg


def test_warmup_is_linear_from_lr_over_warmup_steps():
    cfg = recipe(schedule="constant")
    assert [lr_at(s, cfg, 20) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_cosine_and_linear_run_from_lr_to_min_lr_after_warmup():
    # 20 steps, 4 of warmup: step 4 starts the decay (progress 0), step 12 is halfway, 24 is past the end.
    cos, lin = recipe(schedule="cosine"), recipe(schedule="linear")
    assert lr_at(4, cos, 20) == pytest.approx(1e-3) and lr_at(4, lin, 20) == pytest.approx(1e-3)
    assert lr_at(12, cos, 20) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(12, lin, 20) == pytest.approx(5.5e-4)
    assert lr_at(24, cos, 20) == pytest.approx(1e-4) and lr_at(24, lin, 20) == pytest.approx(1e-4)


def test_wsd_holds_the_peak_then_decays_linearly_to_min_lr_on_the_last_step():
    cfg = recipe(schedule="wsd", decay_steps=4)
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[4:16] == pytest.approx([1e-3] * 12)  # stable
    assert lrs[16:] == pytest.approx([7.75e-4, 5.5e-4, 3.25e-4, 1e-4])  # 4 decay steps, the last at min_lr


def test_wsd_decays_over_the_last_fifth_by_default():
    cfg = recipe(schedule="wsd", warmup_steps=0)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[79] == pytest.approx(1e-3) and lrs[80] < 1e-3 and lrs[99] == pytest.approx(1e-4)


def test_decay_steps_is_checked():
    with pytest.raises(ConfigError, match=r"optim.decay_steps=-1 must be an integer >= 0"):
        OptimConfig(schedule="wsd", decay_steps=-1)
    with pytest.raises(ConfigError, match=r"optim.decay_steps=5 applies to optim.schedule=wsd only \(schedule is 'cosine'\)"):
        OptimConfig(decay_steps=5)
    with pytest.raises(ConfigError, match=r"optim.schedule='step'"):
        OptimConfig(schedule="step")
