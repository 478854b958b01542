"""GlobalBatchSampler: determinism, sharding, length grouping, resume."""

from __future__ import annotations

import random

import pytest

from prefkd.data.sampler import GlobalBatchSampler, shard


def lengths(n=103, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(n)]


def padding(batches, lens):
    return sum(max(lens[i] for i in b) * len(b) - sum(lens[i] for i in b) for b in batches)


@pytest.mark.parametrize("group", [False, True])
def test_each_epoch_is_a_deterministic_permutation(group):
    lens = lengths()
    s = GlobalBatchSampler(lens, global_batch_size=8, seed=1, group_by_length=group, megabatch_mult=4)
    assert len(s) == 13
    first = list(s)
    assert len(first) == 13 and sorted(i for b in first for i in b) == list(range(103))
    assert sum(len(b) < 8 for b in first) == 1  # one short batch, kept
    assert list(GlobalBatchSampler(lens, 8, seed=1, group_by_length=group, megabatch_mult=4)) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first and sorted(i for b in second for i in b) == list(range(103))
    s.set_epoch(0)
    assert list(s) == first
    assert list(GlobalBatchSampler(lens, 8, seed=2, group_by_length=group, megabatch_mult=4)) != first


def test_drop_last_and_no_shuffle():
    s = GlobalBatchSampler(lengths(), 8, seed=0, drop_last=True)
    batches = list(s)
    assert len(s) == len(batches) == 12 and all(len(b) == 8 for b in batches)
    ordered = list(GlobalBatchSampler(lengths(20), 8, seed=0, shuffle=False))
    assert ordered == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    grouped = GlobalBatchSampler(lengths(), 8, seed=0, group_by_length=True, drop_last=True, megabatch_mult=3)
    assert len(grouped) == len(list(grouped)) == 12 and all(len(b) == 8 for b in grouped)
    assert len(list(GlobalBatchSampler(lengths(5), 8, seed=0, drop_last=True))) == 0


def test_shards_concatenate_to_the_global_batch():
    s = GlobalBatchSampler(lengths(), global_batch_size=8, seed=0, drop_last=True)
    for batch in s:
        parts = [shard(batch, r, 2, s.global_batch_size) for r in range(2)]
        assert parts[0] + parts[1] == batch and len(parts[0]) == len(parts[1]) == 4
        assert sum((shard(batch, r, 4) for r in range(4)), []) == batch
    last = list(GlobalBatchSampler(lengths(), 8, seed=0))[-1]  # 7 examples, drop_last=False
    assert len(last) == 7 and shard(last, 0, 2, 8) + shard(last, 1, 2, 8) == last
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        shard(batch, 0, 3, 8)
    with pytest.raises(ValueError, match="rank"):
        shard(batch, 2, 2)


def test_length_grouping_reduces_padding():
    lens = lengths(800, seed=3)
    plain = list(GlobalBatchSampler(lens, 8, seed=0))
    grouped = list(GlobalBatchSampler(lens, 8, seed=0, group_by_length=True, megabatch_mult=50))
    assert sorted(i for b in grouped for i in b) == list(range(800))
    assert padding(grouped, lens) < 0.2 * padding(plain, lens)
    assert max(lens[i] for i in grouped[0]) == max(lens)  # the longest batch comes first
    starts = [lens[b[0]] for b in grouped]
    assert starts != sorted(starts, reverse=True)  # but the batch order is shuffled


@pytest.mark.parametrize("group", [False, True])
def test_a_start_batch_resumes_inside_an_epoch(group):
    s = GlobalBatchSampler(lengths(), 8, seed=5, group_by_length=group, megabatch_mult=2)
    s.set_epoch(3)
    full = list(s)
    resumed = GlobalBatchSampler(lengths(), 8, seed=5, group_by_length=group, megabatch_mult=2)
    resumed.set_epoch(3, start=5)
    assert list(resumed) == full[5:]
    resumed.set_epoch(3, start=11)
    assert list(resumed) == full[11:]
    resumed.set_epoch(4)  # a new epoch starts from its first batch
    assert len(list(resumed)) == len(full)
    with pytest.raises(ValueError, match="negative"):
        resumed.set_epoch(3, start=-1)
