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
    out.pop("peft.init_from", None)  # where a fresh run's adapter started; a resume starts from its checkpoint
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


def _tensor_changing(key: str, current: dict) -> bool:
    """Whether a changed `peft.*` key changes the adapter's tensors (the method says which of its fields do not)."""
    from nemo_adapt.peft.base import get_peft_method

    if not key.startswith("peft."):
        return False
    field = key.split(".", 1)[1]
    method = get_peft_method(current.get("peft.method", "none"))
    return field == "method" or method is None or field not in method.resume_safe_fields


def schedule_change(saved_schedule: dict | None, saved_settings: dict | None, cfg, start_step: int,
                    total_steps: int) -> tuple[str, object, object, str] | None:
    """A changed run length that would change the learning rate of a remaining step, or None.

    Args:
        saved_schedule: the checkpoint's `schedule_record` (None for checkpoints that predate it).
        saved_settings: the checkpoint's `resume_settings` (for the duration key to name).
        cfg: the recipe config.
        start_step: steps the checkpoint has done.
        total_steps: the run's length under the recipe.

    Returns:
        (duration key, old value, new value, what it does to the schedule), or None when every remaining
        step keeps its learning rate (a constant schedule runs longer unchanged).
    """
    from nemo_adapt.training.engine import lr_at

    if saved_schedule is None or saved_schedule["total_steps"] == total_steps:
        return None
    old_total = saved_schedule["total_steps"]
    differs = next((k for k in range(start_step, max(old_total, total_steps))
                    if lr_of_schedule(saved_schedule, k) != lr_at(k, cfg, total_steps)), None)
    if differs is None:
        return None
    now, saved = resume_settings(cfg), saved_settings or {}
    key = next((k for k in DURATION_KEYS if saved.get(k) != now.get(k)), DURATION_KEYS[0])
    note = (f"changes the learning-rate schedule (optim.schedule={cfg.optim.schedule!r} over {old_total} steps becomes "
            f"{total_steps} steps): step {differs + 1} would get lr {lr_at(differs, cfg, total_steps):.6g} instead of "
            f"{lr_of_schedule(saved_schedule, differs):.6g}")
    return key, saved.get(key), now.get(key), note


def check_settings(saved: dict | None, current: dict, allowed: list[str], checkpoint: str,
                   data_changed: tuple[str, str] | None = None,
                   schedule: tuple[str, object, object, str] | None = None) -> list[tuple[str, object, object]]:
    """Compare a checkpoint's settings with the recipe's; refuse changes not named in `allowed`.

    Args:
        saved: `resume_settings` stored in the checkpoint (None for checkpoints that predate it:
            nothing to compare).
        current: `resume_settings` of the recipe.
        allowed: `checkpoint.resume_changes`: keys or sections (`optim`, `peft`, `data`) allowed to differ.
        checkpoint: the checkpoint's path, for messages.
        data_changed: (old, new) training-data fingerprints when they differ, else None.
        schedule: a `schedule_change`, else None.

    Returns:
        The accepted changes as (key, old, new).

    Raises:
        ConfigError: a setting changed without being allowed, or changed in a way no resume can take
            (a PEFT field that changes the adapter's tensors) — every one is listed in one message, with
            the override that accepts the acceptable ones — or an `allowed` entry names nothing a
            resume compares.
    """
    changes: list[tuple[str, object, object, str | None]] = []
    if saved is not None:
        for key in sorted((set(saved) | set(current)) - set(DURATION_KEYS)):
            old, new = saved.get(key, "(absent)"), current.get(key, "(absent)")
            if old != new:
                changes.append((key, old, new, None))
    if schedule is not None:
        changes.append(schedule)
    if data_changed is not None:
        changes.append((DATA, data_changed[0], data_changed[1], None))
    known = set(current) | {DATA}
    for entry in allowed:
        if not any(_allowed(entry, k) for k in known):
            raise ConfigError(f"checkpoint.resume_changes names {entry!r}, which is not a setting a resume compares; "
                              f"allowed: {DATA}, {', '.join(COMPARED_SECTIONS)}, or one of "
                              f"{', '.join(sorted(k for k in current if not k.startswith(COMPARED_SECTIONS)))} "
                              f"or an optim./peft. key")
    fixed = [c for c in changes if _tensor_changing(c[0], current)]
    refused = [c for c in changes if c not in fixed and not any(_allowed(a, c[0]) for a in allowed)]
    if fixed or refused:
        def show(k, o, n, note):
            if k == DATA:
                return f"training data (files or data settings): fingerprint {o} -> {n}"
            return f"{k}: {o!r} -> {n!r}" + (f" {note}" if note else "")

        text = f"resuming from {checkpoint!r} would change the run: " + "; ".join(show(*c) for c in fixed + refused)
        if fixed:
            text += (f". {', '.join(c[0] for c in fixed)} change{'s' if len(fixed) == 1 else ''} the adapter's "
                     f"tensors, which the checkpoint holds as trained: restore "
                     f"{'it' if len(fixed) == 1 else 'them'} or start a new run (another run.name)")
        if refused:
            text += (f". A resume continues the run the checkpoint was trained with; to accept "
                     f"{'the other changes' if fixed else 'these changes'} from the next step, add "
                     f"checkpoint.resume_changes=[{','.join(c[0] for c in refused)}]")
            if not fixed:
                text += ", or start a new run (another run.name)"
        raise ConfigError(text)
    return [(k, o, n) for k, o, n, _ in changes]


def check_schedule(saved_schedule: dict | None, saved_settings: dict | None, cfg, start_step: int, total_steps: int,
                   allowed: list[str], checkpoint: str) -> list[tuple[str, object, object]]:
    """Refuse a changed run length that would change the learning rate of a remaining step (see
    `schedule_change`) unless `allowed` names it; for runs whose length is known only with the data.

    Returns:
        The accepted change as [(duration key, old value, new value)], or [].

    Raises:
        ConfigError: the schedule changes and the duration key is not in `allowed`.
    """
    change = schedule_change(saved_schedule, saved_settings, cfg, start_step, total_steps)
    if change is None:
        return []
    return check_settings(None, resume_settings(cfg), allowed, checkpoint, schedule=change)
