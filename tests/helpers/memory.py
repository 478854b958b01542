"""Memory checks of the losses: a dispatch mode counting the logits-sized tensors alive at once, and a loss built
with real inputs on the embedded tiny pair."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prefkd.data.embedded import generate_records
from prefkd.models.tiny import build_tiny
from tests.helpers.pairs import model_inputs


class LargeTensorTracker(TorchDispatchMode):
    """Counts tensors of ≥ ``min_numel`` elements allocated by aten ops while active; ``peak`` = most alive at once,
    ``peak_bytes`` = most bytes of them alive at once. Tensors shaped as one of ``skip`` are not counted (a head
    weight's gradient, V×H)."""

    def __init__(self, min_numel: int, skip: tuple[tuple[int, ...], ...] = ()):
        super().__init__()
        self.min_numel, self.skip, self.peak, self.peak_bytes, self.allocated = min_numel, set(skip), 0, 0, []
        self.alive: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if any(r.alias_info is not None for r in schema.returns):  # views and in-place ops allocate nothing
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel and tuple(t.shape) not in self.skip:
                self.alive.add(t)
                self.allocated.append(f"{func}{tuple(t.shape)}")
                self.peak = max(self.peak, len(self.alive))
                self.peak_bytes = max(self.peak_bytes, sum(x.numel() * x.element_size() for x in self.alive))
        return out


def prepared(loss, same_tokenizer: bool, n_records=8, head_rows: int = 1):
    """The loss set up and built on the embedded tiny pair (cross tokenizers "a" → "b", or "b" → "b"); LossInputs
    from real forward passes (student logits and hidden states as leaves). ``head_rows``: both models' vocabularies
    (embeddings and heads) grown to this many times their tokenizer's, the new rows padding no token uses (as Qwen's
    head has), so that V ≫ H and V ≫ T as in real models. Returns (loss, inputs)."""
    teacher = build_tiny("b" if same_tokenizer else "a", "llama", 32, num_layers=1, seed=1)
    student = build_tiny("b", "gpt2", 32, num_layers=1, seed=2)
    if head_rows != 1:
        for bundle in (teacher, student):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                bundle.model.resize_token_embeddings(head_rows * len(bundle.tokenizer), mean_resizing=False)
    loss.setup(student.tokenizer, teacher.tokenizer)
    loss.build(student.model, teacher.model)
    inputs = model_inputs(student, teacher, generate_records(n_records, seed=3), 64, 128, loss.precompute,
                          loss.precompute_version)
    return loss, inputs
