"""Value checks shared by the recipe schema (`config/`) and the PEFT methods' configs (`peft/`).

Their own module so that neither package imports the other for them: `config` imports the PEFT registry (the
`peft` section's class depends on `peft.method`), and a method's config validates its fields with these.
Each raises `ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

from nemo_adapt.errors import ConfigError


def check_choice(key: str, value, allowed) -> None:
    """Raise ConfigError unless `value` is one of `allowed` (the message lists them)."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(repr, allowed))}")


def check_positive(key: str, value, allow_zero: bool = False, integer: bool = True) -> None:
    """Raise ConfigError unless `value` is a positive (or, with `allow_zero`, non-negative) integer, or with
    `integer=False` any such number; booleans are refused (YAML's `yes` is not a count)."""
    kind = (int,) if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {what} {bound}")
