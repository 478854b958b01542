"""Shared fixtures: where ../shared lives, and the real tokenizers in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before tests.helpers is first imported: its asserts (assert_same_weights, assert_grads_close, ...) are rewritten as in
# the test modules they come from, so failures keep pytest's detailed messages.
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers.shared import load_tokenizer, shared_dir  # noqa: E402


def pytest_configure(config):
    """Tests never touch the user's cache: converted GGUF files, tiny tokenizers, data caches and fetched data sets
    go to a fresh folder per test session (inherited by the subprocesses that tests start)."""
    import tempfile

    os.environ["PREFKD_CACHE"] = config.prefkd_cache = tempfile.mkdtemp(prefix="prefkd-test-cache-")
    beside = Path(__file__).resolve().parents[2] / "shared"  # a clone with the project's shared/ folder beside it
    if not os.environ.get("PREFKD_SHARED") and beside.is_dir():
        os.environ["PREFKD_SHARED"] = str(beside)  # what ${shared_dir:} in the configs resolves to
    # `prefkd.data fetch`'s folder, which ${data_file:} reads before PREFKD_SHARED/data: empty, so that the tests see
    # the shared copy (or nothing), never what the user fetched.
    os.environ["PREFKD_DATA"] = os.path.join(config.prefkd_cache, "data")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_unconfigure(config):
    """The session's cache folder goes with the session (about 1 GB of converted models per worker)."""
    import shutil

    if getattr(config, "prefkd_cache", None):
        shutil.rmtree(config.prefkd_cache, ignore_errors=True)


@pytest.fixture
def shared() -> Path:
    return shared_dir()


@pytest.fixture
def real_tokenizer():
    """real_tokenizer("gpt2" | "qwen1.5" | "mistral" | "tinyllama") -> the real tokenizer, loaded offline."""
    return load_tokenizer
