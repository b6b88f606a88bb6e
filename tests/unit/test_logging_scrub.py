"""Secret scrubbing: secret-looking keys and secret environment values never reach logs."""

from __future__ import annotations

import pytest

from nemo_adapt.logging.scrub import REDACTED, is_secret_key, scrub, secret_env_values


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "WANDB_API_KEY",
        "apiKey",
        "api-key",
        "hf_token",
        "HF_TOKEN",
        "accessToken",
        "token",
        "db_password",
        "PASSWORD",
        "client_secret",
        "AWS_SECRET_ACCESS_KEY",
        "private_key",
        "credentials",
    ],
)
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        # Text tokens are not secrets: these metrics and config keys must survive.
        "train/tokens_per_s",
        "max_new_tokens",
        "tokenizer",
        "eos_token_id",
        "train/token_accuracy",
        "HF_TOKEN_PATH",
        "input_ids",
        "train/loss",
        "secretary",
        "keyboard",
        3,
    ],
)
def test_not_secret_keys(key):
    assert not is_secret_key(key)


def test_scrub_redacts_keys_and_env_values_recursively(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to replace inside other strings
    monkeypatch.setenv("PLAIN_SETTING", "not-a-secret-value")
    data = {
        "model": {"name": "smollm2", "hf_token": "anything"},
        "urls": ["https://user:tok-0123456789@host/x", ("abc", 1)],
        "note": "not-a-secret-value",
        "n": 3,
    }
    out = scrub(data)
    assert out == {
        "model": {"name": "smollm2", "hf_token": REDACTED},
        "urls": [f"https://user:{REDACTED}@host/x", ["abc", 1]],
        "note": "not-a-secret-value",
        "n": 3,
    }
    assert data["model"]["hf_token"] == "anything"  # the input is not modified


def test_secret_env_values_longest_first():
    env = {"A_TOKEN": "secret-1234", "B_TOKEN": "secret-1234-and-more", "HOME": "/home/someone-long"}
    assert secret_env_values(env) == ["secret-1234-and-more", "secret-1234"]
    assert scrub("x secret-1234-and-more y", secret_env_values(env)) == f"x {REDACTED} y"
