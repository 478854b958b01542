"""Where a loss's teacher outputs come from in a training step: the live teacher model, or the teacher cache.

Both are called the same way, ``source(batch, hidden) -> ModelOutputs``, and say which fields a batch needs
(``batch_fields``), so the trainer does not branch on it.
"""

from __future__ import annotations

import torch

from prefkd.losses.base import ModelOutputs
from prefkd.training.fused_head import model_outputs


class LiveTeacher:
    """Runs the frozen teacher on the batch's teacher rows (``teacher_input_ids``, B×m), without gradients.
    ``fused``: it builds no logits and hands the loss its last hidden state and output head."""

    def __init__(self, model, fused: bool = False):
        self.model, self.fused = model, fused

    def batch_fields(self, split: str, indices: list[int]) -> dict:
        """Fields a batch needs for this source: none (the teacher reads the batch's token ids)."""
        return {}

    @torch.no_grad()
    def __call__(self, batch: dict, hidden: bool) -> ModelOutputs:
        return model_outputs(self.model, batch["teacher_input_ids"], batch["teacher_attention_mask"], hidden=hidden,
                             fused=self.fused)


class CachedTeacher:
    """Reads the teacher's outputs for the batch's examples (``example_index`` of split ``cache_split``) from a
    :class:`prefkd.training.teacher_cache.TeacherCache`; ``model`` (the teacher, never run) gives a hidden-state
    cache its output head and embeddings. ``fused``: a hidden-state cache hands the loss the hidden states and the
    head, not head(h)."""

    def __init__(self, cache, model=None, device: torch.device | str = "cpu", fused: bool = False):
        self.cache, self.model, self.device, self.fused = cache, model, device, fused

    def batch_fields(self, split: str, indices: list[int]) -> dict:
        """The examples' split, by which (with their ``example_index``) the cache is read."""
        return {"cache_split": split}

    @torch.no_grad()
    def __call__(self, batch: dict, hidden: bool) -> ModelOutputs:
        return self.cache.outputs(batch["cache_split"], batch["example_index"].tolist(),
                                  batch["teacher_input_ids"].shape[1], self.device, self.model, fused=self.fused)
