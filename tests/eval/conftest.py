"""Tiny random models for the evaluation tests, saved with the real TinyLLaMA tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.shared import shared_dir
from tests.helpers.tiny_llama import tiny_config


def build_tiny(directory: Path, tokenizer, seed: int = 0) -> Path:
    """A random 2-layer LLaMA (hidden 32) with ``tokenizer`` saved into ``directory``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_dir() / "tokenizers" / "tinyllama"))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Directory of a tiny random LLaMA with the TinyLLaMA tokenizer (vocabulary 32,000)."""
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded from ``tiny_dir`` through prefkd's loader, in eval mode."""
    from prefkd.models.loading import load_model

    bundle = load_model(str(tiny_dir), device="cpu")
    return bundle.model, bundle.tokenizer
