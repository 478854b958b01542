"""Global-batch sampling: one list of example indices per optimizer step, identical on every rank.

The order depends only on ``(seed, epoch)``, so every process computes the same global batches without
communication, and a run resumed at global batch k of an epoch continues with exactly the batches it would
have seen (``skip(k)``). Each rank takes its contiguous slice of a global batch with :func:`shard`.

Length grouping (like Hugging Face's ``LengthGroupedSampler``): shuffle, split into megabatches of
``megabatch_mult × global_batch_size`` examples, sort each megabatch by length (longest first), cut it into
global batches, shuffle the order of the batches, and move the batch holding the longest example to the
front (an out-of-memory error then shows at the first step, not hours later).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def shard(global_batch: Sequence[int], rank: int, world_size: int,
          global_batch_size: int | None = None) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch: ``global_batch[r·b:(r+1)·b]``, b = size / world.

    ``global_batch_size`` (default ``len(global_batch)``) must be divisible by ``world_size``. A last,
    incomplete batch (``drop_last=False``) is split into ``world_size`` near-equal contiguous slices.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    size = len(global_batch) if global_batch_size is None else global_batch_size
    if size % world_size:
        raise ValueError(f"the global batch size {size} is not divisible by the number of processes "
                         f"{world_size}: choose batch_size × gradient_accumulation_steps × processes so "
                         f"that every process gets the same number of examples.")
    batch = list(global_batch)
    if len(batch) == size:
        per = size // world_size
        return batch[rank * per:(rank + 1) * per]
    bounds = np.linspace(0, len(batch), world_size + 1).round().astype(int)
    return batch[bounds[rank]:bounds[rank + 1]]


class GlobalBatchSampler:
    """Yields lists of example indices, one list per global batch (``global_batch_size`` indices, the
    last one shorter unless ``drop_last``).

    ``set_epoch(epoch)`` picks the epoch (the order is a function of ``(seed, epoch)`` only) and resets
    ``start``; ``set_epoch(epoch, start=k)`` makes the next iteration begin at global batch k of the epoch, for
    resuming. :func:`shard` splits a global batch among processes. ``len()`` is the number of global batches of a
    whole epoch.
    """

    def __init__(self, lengths: Sequence[int], global_batch_size: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = False, drop_last: bool = False, megabatch_mult: int = 50):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if megabatch_mult < 1:
            raise ValueError(f"megabatch_mult must be >= 1, got {megabatch_mult}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch_size, self.seed = int(global_batch_size), int(seed)
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.drop_last, self.megabatch_mult = drop_last, int(megabatch_mult)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order the next iteration yields, beginning at global batch ``start``."""
        if start < 0:
            raise ValueError(f"cannot start an epoch at a negative global batch ({start})")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        n, b = len(self.lengths), self.global_batch_size
        return n // b if self.drop_last else -(-n // b)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All global batches of ``epoch`` (default: the current one), ignoring ``start``."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        n, b = len(self.lengths), self.global_batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if not self.group_by_length:
            batches = [order[i:i + b] for i in range(0, n, b)]
            return [x.tolist() for x in batches if len(x) == b or not self.drop_last]
        mega = b * self.megabatch_mult
        batches = []
        for i in range(0, n, mega):
            chunk = order[i:i + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[j:j + b] for j in range(0, len(chunk), b)]
        # Only the very last batch can be short; it lies at the end of the last megabatch.
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        if not batches:
            return []
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda k: self.lengths[batches[k]].max())
        batches[0], batches[longest] = batches[longest], batches[0]
        return [x.tolist() for x in batches]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start:]
