"""Fixtures of the end-to-end tests: one tokenizer/data cache and one tiny chat dataset per test module."""

import pytest

from tests.conftest import write_tiny_chat_data


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"NEMO_ADAPT_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_chat_data(tmp_path_factory.mktemp("tiny_data"))
