"""LoRA+ (`peft.lr_ratio_b`): B trains at a multiple of the learning rate, A at the rate itself."""

import pytest

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.lora import LoRAConfig


@pytest.mark.parametrize("value", [0, -2.0, "16"])
def test_ratio_must_be_a_positive_number(value):
    with pytest.raises(ConfigError, match=rf"peft.lr_ratio_b={value!r} must be a number > 0"):
        LoRAConfig(lr_ratio_b=value)


@pytest.mark.megatron
@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_first_adam_step_moves_b_by_ratio_times_lr(ratio):
    """Adam's first update is lr * m/sqrt(v) = lr * sign(grad) per element, so after one real
    engine step every B element that moved moved by exactly its group's rate: ratio x lr. A does
    not move at step 1 (B starts at zero, so no gradient reaches A)."""
    from nemo_adapt.config.schema import RecipeConfig
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.training import engine
    from tests.distributed.peft_battery_worker import GBS, MBS, SEQ, batches

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    cfg = RecipeConfig()
    cfg.peft = LoRAConfig(rank=4, alpha=8, lr_ratio_b=ratio)
    cfg.train.global_batch_size, cfg.train.micro_batch_size = GBS, MBS
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps = 1e-3, "constant", 0
    model, _ = load_model("random:tiny_llama", "tiny_llama")
    model.config.calculate_per_token_loss = True
    method = apply_peft(model, cfg.peft, seed=7)
    ddp = engine.wrap_ddp(model, cfg)
    optimizer = engine.build_optimizer(ddp, cfg, method.lr_multipliers())
    engine.connect_schedule_hooks(ddp, optimizer)

    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    group_mult = {names[id(p)]: g["lr_mult"] for g in optimizer.param_groups for p in g["params"] if id(p) in names}
    assert len(group_mult) == len(names)  # every trainable parameter is in exactly one group we can see
    for name, mult in group_mult.items():
        assert mult == (ratio if name.endswith("adapter.up.weight") else 1.0), name

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.train_step(ddp, optimizer, batches(0), SEQ, MBS, cfg.optim.lr)
    moved_b = moved_a = 0
    for name, p in model.named_parameters():
        if name not in before:
            continue
        step = (p.detach() - before[name]).abs()
        if name.endswith("adapter.up.weight"):
            rate = ratio * cfg.optim.lr
            # Exactly the rate where |grad| >> Adam's eps (1e-8), never more; a few tiny gradients move less.
            assert float(step.max()) == pytest.approx(rate, rel=1e-4), name
            assert float((step - rate).abs().div(rate).lt(0.01).float().mean()) > 0.9, name
            moved_b += 1
        elif name.endswith("adapter.down.weight"):
            assert float(step.max()) == 0.0, name
            moved_a += 1
    assert moved_b == moved_a > 0
