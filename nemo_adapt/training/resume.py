"""What a resume must not change silently: the settings a checkpoint was trained with.

A checkpoint's `state.json` records the recipe settings that decide what the next steps compute —
seed (data order, dropout), global batch size, precision, optimizer and LR schedule, the PEFT
method's settings, data shuffling — and the resolved LR schedule. Resuming with any of them changed
is refused with one message that lists every change (old -> new) and the override that accepts it,
`checkpoint.resume_changes=[key, ...]`. The duration (`run.max_steps`, `run.max_epochs`) may grow
freely while it leaves every remaining step's learning rate as it was (a constant schedule); when
the LR of any remaining step would change (cosine, linear and WSD decay over the run's length), it
is refused the same way. An accepted change is applied from the next step and reported: the
learning rate of that step under the checkpoint's schedule and under the recipe's. The data position is stored as consumed samples (see `engine.StepData`), so a changed
global batch size continues exactly where the data stopped.

Layout changes (TP/PP/DP/VP) are not settings of the run: checkpoints reshard, and they are free.
"""

from __future__ import annotations

from types import SimpleNamespace

from nemo_adapt.errors import ConfigError

COMPARED_KEYS = ("run.seed", "train.global_batch_size", "train.precision", "train.grad_clip", "data.shuffle")
"""Single settings a resume compares; every field of the `optim` and `peft` sections is compared too."""
DURATION_KEYS = ("run.max_steps", "run.max_epochs")
"""Recorded with the settings, but judged by what they do to the LR schedule (`check_schedule`)."""
COMPARED_SECTIONS = ("optim", "peft")
DATA = "data"
"""The name under which a changed training-data fingerprint (files or tokenization settings) is reported."""


def _flatten(section: str, values: dict) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(f"{section}.{key}", value))
        else:
            out[f"{section}.{key}"] = value
    return out


def resume_settings(cfg) -> dict:
    """The settings a checkpoint records and a resume compares, as flat `section.key` -> value.

    Args:
        cfg: the recipe config.

    Returns:
        JSON-safe values (lists for tuples).
    """
    from nemo_adapt.config import config_to_dict

    plain = config_to_dict(cfg)
    out = {}
    for key in COMPARED_KEYS + DURATION_KEYS:
        section, name = key.split(".", 1)
        out[key] = plain[section][name]
    for section in COMPARED_SECTIONS:
        out.update(_flatten(section, plain[section]))
    return out


def schedule_record(cfg, total_steps: int) -> dict:
    """The resolved learning-rate schedule, as stored in a checkpoint's state.

    Args:
        cfg: the recipe config.
        total_steps: optimizer steps of the whole run (the horizon the schedule decays over).

    Returns:
        {"total_steps", "optim": the `optim` section}.
    """
    from nemo_adapt.config import config_to_dict

    return {"total_steps": int(total_steps), "optim": config_to_dict(cfg)["optim"]}


def lr_of_schedule(schedule: dict, step: int) -> float:
    """The learning rate a stored schedule gives optimizer step `step` (0-based)."""
    from nemo_adapt.training.engine import lr_at

    return lr_at(step, SimpleNamespace(optim=SimpleNamespace(**schedule["optim"])), schedule["total_steps"])


def _allowed(entry: str, key: str) -> bool:
    return key == entry or key.startswith(entry + ".")


def check_settings(saved: dict | None, current: dict, allowed: list[str], checkpoint: str,
                   data_changed: tuple[str, str] | None = None) -> list[tuple[str, object, object]]:
    """Compare a checkpoint's settings with the recipe's; refuse changes not named in `allowed`.

    Args:
        saved: `resume_settings` stored in the checkpoint (None for checkpoints that predate it:
            nothing to compare).
        current: `resume_settings` of the recipe.
        allowed: `checkpoint.resume_changes`: keys or sections (`optim`, `peft`, `data`) allowed to differ.
        checkpoint: the checkpoint's path, for messages.
        data_changed: (old, new) training-data fingerprints when they differ, else None.

    Returns:
        The accepted changes as (key, old, new).

    Raises:
        ConfigError: a setting changed without being allowed (every one is listed, with the override
            that accepts them), or an `allowed` entry names nothing a resume compares.
    """
    changes = []
    if saved is not None:
        for key in sorted((set(saved) | set(current)) - set(DURATION_KEYS)):
            old, new = saved.get(key, "(absent)"), current.get(key, "(absent)")
            if old != new:
                changes.append((key, old, new))
    if data_changed is not None:
        changes.append((DATA, data_changed[0], data_changed[1]))
    known = set(current) | {DATA}
    for entry in allowed:
        if not any(_allowed(entry, k) for k in known):
            raise ConfigError(f"checkpoint.resume_changes names {entry!r}, which is not a setting a resume compares; "
                              f"allowed: {DATA}, {', '.join(COMPARED_SECTIONS)}, or one of "
                              f"{', '.join(sorted(k for k in current if not k.startswith(COMPARED_SECTIONS)))} "
                              f"or an optim./peft. key")
    refused = [c for c in changes if not any(_allowed(a, c[0]) for a in allowed)]
    if refused:
        lines = "; ".join(f"{k}: {o!r} -> {n!r}" if k != DATA else
                          f"training data (files or data settings): fingerprint {o} -> {n}" for k, o, n in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigError(f"resuming from {checkpoint!r} would change the run: {lines}. A resume continues the run "
                          f"the checkpoint was trained with; to accept these changes from the next step, add "
                          f"checkpoint.resume_changes=[{keys}], or start a new run (another run.name)")
    return changes


def check_schedule(saved_schedule: dict | None, saved_settings: dict | None, cfg, start_step: int, total_steps: int,
                   allowed: list[str], checkpoint: str) -> list[tuple[str, object, object]]:
    """Refuse a changed run length that would change the learning rate of a remaining step.

    Args:
        saved_schedule: the checkpoint's `schedule_record` (None for checkpoints that predate it).
        saved_settings: the checkpoint's `resume_settings` (for the duration keys it names).
        cfg: the recipe config (its `optim` section equals the checkpoint's: `check_settings` ran first).
        start_step: steps the checkpoint has done.
        total_steps: the run's length under the recipe.
        allowed: `checkpoint.resume_changes`.
        checkpoint: the checkpoint's path, for messages.

    Returns:
        The accepted change as [(duration key, old total steps, new total steps)], or [].

    Raises:
        ConfigError: the schedule changes and no duration key (or `run`) is in `allowed`.
    """
    from nemo_adapt.training.engine import lr_at

    if saved_schedule is None or saved_schedule["total_steps"] == total_steps:
        return []
    old_total = saved_schedule["total_steps"]
    differs = next((k for k in range(start_step, max(old_total, total_steps))
                    if lr_of_schedule(saved_schedule, k) != lr_at(k, cfg, total_steps)), None)
    if differs is None:
        return []  # e.g. a constant schedule: running longer changes no step's learning rate
    saved_settings = saved_settings or {}
    key = next((k for k in DURATION_KEYS if saved_settings.get(k) != resume_settings(cfg).get(k)), DURATION_KEYS[0])
    if any(_allowed(a, key) for a in allowed):
        return [(key, old_total, total_steps)]
    old_lr, new_lr = lr_of_schedule(saved_schedule, differs), lr_at(differs, cfg, total_steps)
    raise ConfigError(
        f"resuming from {checkpoint!r} would change the run: {key}: {saved_settings.get(key)!r} -> "
        f"{resume_settings(cfg).get(key)!r} changes the learning-rate schedule (optim.schedule="
        f"{cfg.optim.schedule!r} over {old_total} steps becomes {total_steps} steps): step {differs + 1} would "
        f"get lr {new_lr:.6g} instead of {old_lr:.6g}. To accept the new schedule from the next step, add "
        f"checkpoint.resume_changes=[{key}], or start a new run (another run.name)")
