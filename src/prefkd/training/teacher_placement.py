"""Where the teacher lives in a run: whole on every device (the default), or sharded across the processes
(``teacher.shard=true``), its shards optionally in CPU memory (``teacher.offload=cpu``). Issue 18.

The two keys sit in the teacher's config group beside the model's own keys; :func:`split_teacher_config` takes them
out before the model factory is called, and :meth:`TeacherPlacement.check` refuses what cannot work before any model
loads. :func:`place_teacher` then shards the loaded teacher (:func:`prefkd.models.sharding.shard_frozen`) or moves it
to the device, and says in one log line what it did and how much of the teacher this process holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from prefkd.models.sharding import local_bytes, shard_frozen

log = logging.getLogger(__name__)

OFFLOAD = ("none", "cpu")


@dataclass(frozen=True)
class TeacherPlacement:
    """``shard``: shard the frozen teacher over all processes (FSDP2); ``offload``: ``none`` or ``cpu`` (the shards
    stay in CPU memory and go to the device one layer at a time)."""

    shard: bool = False
    offload: str = "none"

    def __post_init__(self):
        if not isinstance(self.shard, bool):
            raise ValueError(f"teacher.shard={self.shard!r}: use true or false")
        if self.offload not in OFFLOAD:
            raise ValueError(f"teacher.offload={self.offload!r}: use one of {', '.join(OFFLOAD)}")

    def check(self, *, processes: int, teacher_cache: bool) -> None:
        """Refuse combinations that cannot work, naming the keys: offload without sharding, offload with one process
        (nothing is sharded), sharding with a teacher cache (the cache hands the teacher's outputs; no model runs)."""
        if self.offload != "none" and not self.shard:
            raise ValueError(f"teacher.offload={self.offload} keeps the shards of a sharded teacher in CPU memory: set "
                             f"teacher.shard=true too, or teacher.offload=none")
        if self.offload != "none" and processes == 1:
            raise ValueError(f"teacher.offload={self.offload} with one process: the teacher is sharded across "
                             f"processes, and one process holds it whole; launch several (torchrun --nproc_per_node "
                             f"N, accelerate launch --num_processes N) or set teacher.offload=none")
        if self.shard and teacher_cache:
            raise ValueError("teacher.shard=true with trainer.teacher_cache: the cache hands the teacher's outputs, so "
                             "no teacher model runs to shard; drop one of the two")


def split_teacher_config(node: DictConfig) -> tuple[DictConfig, TeacherPlacement]:
    """(the teacher's model config without the placement keys, for ``instantiate``; its :class:`TeacherPlacement`)."""
    model = node.copy()
    with open_dict(model):
        shard, offload = model.pop("shard", False), model.pop("offload", "none")
    return model, TeacherPlacement(shard=shard, offload=str(offload))


def place_teacher(model, placement: TeacherPlacement, *, device, processes: int):
    """The teacher on this process: sharded over ``processes`` (``placement.shard`` with more than one process), else
    moved whole to ``device``. Logs one line; returns the model (sharded in place)."""
    if not placement.shard:
        return model.to(device)
    if processes == 1:
        log.info("teacher.shard=true with one process: nothing to shard; the teacher is whole on %s", device)
        return model.to(device)
    shard_frozen(model, device=device, offload_to_cpu=placement.offload == "cpu")
    held, total = local_bytes(model)
    log.info("teacher.shard: the teacher's decoder layers are sharded over %d processes%s; this process holds %.1f "
             "of its %.1f MB (embedding and head whole)", processes,
             ", their shards in CPU memory" if placement.offload == "cpu" else "", held / 2**20, total / 2**20)
    return model
