"""Keep secrets out of logs: redact secret-looking keys and the values of secret environment variables.

Everything the run logger writes (metrics.jsonl, the W&B config, summary and events) goes through
`scrub` first. Two rules:

1. A value whose *key* looks like a secret (`hf_token`, `WANDB_API_KEY`, `apiKey`, `db_password`,
   `client_secret`, ...) is replaced by `REDACTED`, whatever the value is.
2. Any string that contains the value of a secret-looking environment variable (the same name rule
   applied to the environment) has that value replaced, wherever it appears (a token pasted into a
   run name, a URL with credentials in a data path).

Environment variables themselves are never logged; rule 2 only reads them to know what to hide.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
"""What a secret value is replaced with."""

# Matched against a normalised key (camelCase split, lower case, every non-alphanumeric run -> "_").
# In an LLM framework most keys with "token" in them are about *text* tokens, so "token" counts only
# as the last word: hf_token, access_token, GITHUB_TOKEN are secrets; train/tokens_per_s,
# max_new_tokens, tokenizer, eos_token_id, train/token_accuracy are not. The other words count anywhere.
_SECRET_KEY = re.compile(
    r"(?:^|_)(?:api_?keys?|secrets?|passwords?|passwd|credentials?|private_?keys?)(?:_|$)|(?:^|_)token$"
)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")

# Shorter environment values are too likely to occur by chance ("1", "true", a short user name).
_MIN_ENV_SECRET_LEN = 8


def is_secret_key(key: object) -> bool:
    """Whether a key (config field, event field, environment variable name) names a secret.

    Args:
        key: The key; non-strings are never secret.

    Returns:
        True when a word of the key is api_key/apikey, secret(s), password(s), passwd, credential(s)
        or private_key, or its last word is token; case-insensitive.
    """
    if not isinstance(key, str):
        return False
    normalised = _NON_ALNUM.sub("_", _CAMEL_BOUNDARY.sub("_", key).lower())
    return _SECRET_KEY.search(normalised) is not None


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like secrets, longest first.

    Args:
        environ: The environment to read (default: `os.environ`).

    Returns:
        The distinct values at least 8 characters long; longest first so that a secret containing
        another one is replaced whole.
    """
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_key(k) and len(v) >= _MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def scrub(value: Any, env_secrets: list[str] | None = None) -> Any:
    """Return a copy of `value` with secrets redacted (see the module docstring for the rules).

    Mappings become dicts (keys kept as they are), lists and tuples become lists, strings have
    secret environment values replaced; other values are returned unchanged.

    Args:
        value: A config dict, event fields, a metric value, a run name.
        env_secrets: Secret strings to hide (default: `secret_env_values()` of the current environment).

    Returns:
        The scrubbed copy.
    """
    secrets = secret_env_values() if env_secrets is None else env_secrets
    return _scrub(value, secrets)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) else _scrub(v, secrets)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    return value
