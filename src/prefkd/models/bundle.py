"""What every model factory returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase


@dataclass
class ModelBundle:
    """A causal LM with its tokenizer. ``name`` is for logs and cache keys (a path or hub id, or a
    description such as ``tiny-llama(bpe-a)``). The tokenizer has a pad token (pad := eos when missing)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
