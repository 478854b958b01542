"""Two-process (gloo) runs for the distributed checks: a process group inside a spawned worker, and spawning the
ranks."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """Inside a spawned worker: one thread, a gloo process group for the block, destroyed after it."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker, tmp_path, world: int = 2) -> list:
    """Run ``worker(rank, world, init_file, out_dir)`` on ``world`` processes, each saving ``out_dir/rank{r}.pt``;
    return what the ranks saved, in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


