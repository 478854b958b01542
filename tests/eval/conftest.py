"""Tiny random models for the evaluation tests, saved with the real TinyLLaMA tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import shared_dir


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


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
    from prefkd.evaluate import load_model

    bundle = load_model(str(tiny_dir), device="cpu")
    return bundle.model, bundle.tokenizer
