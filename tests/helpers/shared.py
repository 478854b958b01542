"""Where ../shared lives (skip without it, an error under CI=true), its real tokenizers, the real tokenizer pairs,
and a free TCP port."""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """`PREFKD_SHARED` or ../shared. Missing: an error under CI=true, a skip on a user's fresh clone."""
    path = Path(os.environ.get("PREFKD_SHARED", REPO.parent / "shared"))
    if not (path / "SPEC.md").exists():
        msg = f"shared/ not found at {path} (set PREFKD_SHARED to the folder holding SPEC.md, data/, tokenizers/)"
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError(msg)
        pytest.skip(msg)
    return path


@cache
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_dir() / "tokenizers" / name))


# The two real cross-tokenizer pairs of the papers: (teacher, student).
REAL_PAIRS = [("qwen1.5", "gpt2"), ("mistral", "tinyllama")]


def free_port() -> str:
    """A TCP port nobody listens on now (torchrun's --master_port), so parallel test workers never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
