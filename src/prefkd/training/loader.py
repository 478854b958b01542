"""The training data loader: this process's micro-batches of every optimizer step, collated ahead of the step.

A ``torch.utils.data.DataLoader`` over the dataset, whose batch sampler (:class:`StepSampler`) walks the global
batches of :class:`prefkd.data.sampler.GlobalBatchSampler` (from the epoch's ``start``, for an exact resume), cuts
each into micro-batches of ``batch_size × processes`` examples and yields this process's slice of each
(:func:`prefkd.data.sampler.shard`). So the examples a step sees are those of the sampler whatever the number of
workers: ``trainer.num_workers`` worker processes collate ``trainer.prefetch_factor`` micro-batches ahead each
(0 workers: collated in the training process, as it runs), and ``trainer.pin_memory`` pins them for a fast copy to
a GPU. The collated dict also carries the examples' indices and the fields the teacher source needs
(:meth:`batch_fields`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prefkd.data.dataset import collate
from prefkd.data.sampler import GlobalBatchSampler, shard


class StepSampler(Sampler[list[int]]):
    """This process's micro-batches (example index lists) of the global batches of ``sampler``'s epoch, in order:
    ``steps_per_batch`` of them per global batch (the gradient accumulation)."""

    def __init__(self, sampler: GlobalBatchSampler, micro: int, rank: int, world: int):
        self.sampler, self.micro, self.rank, self.world = sampler, micro, rank, world
        self.micro_per_step = -(-sampler.global_batch_size // (micro * world))

    def __iter__(self) -> Iterator[list[int]]:
        per_micro = self.micro * self.world
        for global_batch in self.sampler:
            for k in range(0, len(global_batch), per_micro):
                yield shard(global_batch[k:k + per_micro], self.rank, self.world)

    def __len__(self) -> int:
        return (len(self.sampler) - self.sampler.start) * self.micro_per_step


class _Indexed(Dataset):
    """(index, example) pairs, so that the collate function knows which examples it batches."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]


class Collate:
    """Examples -> one padded micro-batch (the dataset's own ``collate`` when it has one: preference pairs), plus the
    examples' positions in the dataset (``example_index``, B) and the teacher source's ``batch_fields(split,
    indices)``."""

    def __init__(self, dataset, pad_id: int, teacher_pad_id: int | None, batch_fields: Callable, split: str):
        self.make = getattr(dataset, "collate", collate)
        self.pad_id, self.teacher_pad_id, self.batch_fields, self.split = pad_id, teacher_pad_id, batch_fields, split

    def __call__(self, items: list) -> dict:
        indices = [i for i, _ in items]
        batch = self.make([example for _, example in items], self.pad_id, self.teacher_pad_id)
        batch["example_index"] = torch.tensor(indices, dtype=torch.long)
        batch.update(self.batch_fields(self.split, indices))
        return batch


def build_loader(dataset, steps: StepSampler, collate_fn: Collate, *, num_workers: int = 0,
                 prefetch_factor: int | None = 2, pin_memory: bool = False) -> DataLoader:
    """The DataLoader of :mod:`prefkd.training.loader`; ``pin_memory`` only takes effect with a GPU."""
    return DataLoader(_Indexed(dataset), batch_sampler=steps, collate_fn=collate_fn, num_workers=num_workers,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      pin_memory=pin_memory and torch.cuda.is_available())
