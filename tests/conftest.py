"""Shared fixtures: where ../shared lives, and the real tokenizers in it."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Tests never touch the user's cache: converted GGUF files, tiny tokenizers and data caches go to a
    fresh folder per test session (inherited by the subprocesses that tests start)."""
    import tempfile

    os.environ["PREFKD_CACHE"] = tempfile.mkdtemp(prefix="prefkd-test-cache-")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_dir() -> Path:
    """`PREFKD_SHARED` or ../shared. Missing: an error under CI=true, a skip on a user's fresh clone."""
    path = Path(os.environ.get("PREFKD_SHARED", REPO.parent / "shared"))
    if not (path / "SPEC.md").exists():
        msg = f"shared/ not found at {path} (set PREFKD_SHARED to the folder holding SPEC.md, data/, tokenizers/)"
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError(msg)
        pytest.skip(msg)
    return path


@lru_cache(maxsize=None)
def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_dir() / "tokenizers" / name))


@pytest.fixture
def shared() -> Path:
    return shared_dir()


@pytest.fixture
def real_tokenizer():
    """real_tokenizer("gpt2" | "qwen1.5" | "mistral" | "tinyllama") -> the real tokenizer, loaded offline."""
    return _load_tokenizer


# The two real cross-tokenizer pairs of the papers: (teacher, student).
REAL_PAIRS = [("qwen1.5", "gpt2"), ("mistral", "tinyllama")]


def free_port() -> str:
    """A TCP port nobody listens on now (torchrun's --master_port), so parallel test workers never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
