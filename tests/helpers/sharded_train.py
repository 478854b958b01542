"""One process of a small training run for tests/test_sharded_checkpoint.py: the tiny llama student and a loss with
its own projector in a :class:`DistillModule`, AdamW with the trainer's parameter groups, on seeded random batches.

With ``--world 2`` the processes form a gloo group and the module is sharded with FSDP2 (``fully_shard``: the
decoder layers, then the whole module); with ``--world 1`` it stays plain. Each optimizer step's global batch is a
function of the step (each process takes its rows), and the loss is normalised over the whole global batch as in
the trainer, so a resumed run needs no data or RNG state.

``--save-at K`` saves the training state (:func:`prefkd.training.train_state.save_train_state`) after step K into
``--checkpoint``; ``--die`` then SIGKILLs every process (a run lost after its save). ``--resume`` loads it first and
continues after step K. Rank 0 writes into ``--out``: ``losses.json`` (the global loss of each step) and the gathered
full state (parameters and optimizer) as ``at-save.pt`` (just after the save), ``loaded.pt`` (just after a resume)
and ``final.pt``.

    python -m tests.helpers.sharded_train --world 2 --rank 0 --init /tmp/x/init --out /tmp/x --steps 6 --save-at 3 ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs
from prefkd.losses.divergences import cross_entropy_sum
from prefkd.models.tiny import build_tiny
from prefkd.training.distill_module import DistillModule
from prefkd.training.optim import param_groups
from prefkd.training.train_state import load_train_state, save_train_state

GLOBAL_BATCH, LENGTH, PROMPT = 4, 12, 4


class ProjectedSFT(DistillationLoss):
    """Cross-entropy on the response tokens plus a projector's term on the student's hidden states:
    Σ_t CE_t + 0.1 Σ_t ‖W h_t‖² / d (a loss with its own trainable module, as the OT/DSKD losses have)."""

    needs = Needs(hidden_states=True)

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 8)
        self.steps_seen = 0  # non-tensor state: get_extra_state

    def get_extra_state(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def set_extra_state(self, state: dict) -> None:
        self.steps_seen = state["steps_seen"]

    def forward(self, inputs: LossInputs) -> LossOutput:
        mask = inputs.batch["labels"].ne(-100)
        ce = cross_entropy_sum(inputs.student.logit_source, inputs.batch["labels"], chunk_size=64)
        hidden = inputs.student.hidden[mask]
        return LossOutput(loss=ce + 0.1 * self.proj(hidden).pow(2).sum() / hidden.shape[-1], metrics={})

    def on_optimizer_step(self, step: int) -> None:
        self.steps_seen = step


def global_batch(step: int, vocab: int) -> dict:
    """The global batch of optimizer step ``step`` (0-based): GLOBAL_BATCH rows of LENGTH tokens, the first PROMPT
    of each masked from the labels."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (GLOBAL_BATCH, LENGTH), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build(world: int, fused: bool = False, reshard_root: bool = False):
    """(module, optimizer): the DistillModule (sharded with FSDP2 when world > 1) and AdamW on its parameters.
    ``fused``: the student hands the loss its hidden states and head (no logits built); ``reshard_root``: the whole
    module, too, gives its gathered parameters back after the forward (``reshard_after_forward=True``, as
    Accelerate's ``fsdp_reshard_after_forward: true`` passes it; FSDP's own default keeps the root's gathered)."""
    student = build_tiny("a", "llama", hidden_size=32, num_layers=2, num_heads=2, seed=0).model
    torch.manual_seed(1)  # the projector's initialisation: the same on every process
    module = DistillModule(student, ProjectedSFT(32), fused_head=fused)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh, reshard_after_forward=True if reshard_root else None)
    groups = param_groups(module.student, module.loss, lr=1e-2, projector_lr=3e-2, weight_decay=0.01)
    return module, torch.optim.AdamW(groups, lr=1e-2)


def train_step(module, optimizer, step: int, rank: int, world: int) -> float:
    """One optimizer step on this process's rows of the global batch; returns the global loss per token."""
    batch = global_batch(step, module.student.config.vocab_size)
    units = batch["labels"].ne(-100).sum().item()
    rows = GLOBAL_BATCH // world
    mine = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
    loss, _, _ = module(mine, step=step)
    (loss * world / units).backward()  # FSDP averages the gradients over the processes, as DDP does
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module.loss.on_optimizer_step(step + 1)
    total = loss.detach().clone()
    if world > 1:
        dist.all_reduce(total)
    return total.item() / units


def dump(module, optimizer, path: Path, rank: int) -> None:
    """The full (gathered) parameters, optimizer state and the loss's extra state, written by rank 0."""
    model_state, optim_state = get_state_dict(module, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": model_state, "optimizer": optim_state, "steps_seen": module.loss.steps_seen}, path)


def main(argv: list[str] | None = None) -> None:
    """One process's run (``argv``: the command line's arguments). In the caller's process with ``--world 1``."""
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--init", default=None, help="file:// rendezvous of the gloo group (world > 1)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--die", action="store_true", help="SIGKILL every process right after the save")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fused", action="store_true", help="fused output head: the loss projects the logits per chunk")
    p.add_argument("--reshard-root", action="store_true", help="reshard the whole module after its forward too")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(a)
    finally:
        torch.set_num_threads(threads)


def run(a: argparse.Namespace) -> None:
    if a.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{a.init}", rank=a.rank, world_size=a.world)
    module, optimizer = build(a.world, fused=a.fused, reshard_root=a.reshard_root)
    start, losses = 0, {}
    if a.resume:
        extra = torch.load(a.checkpoint.parent / "extra.pt", weights_only=True)
        load_train_state(a.checkpoint, module, optimizer, extra=extra)
        start = json.loads((a.checkpoint.parent / "step.json").read_text())["step"]
        dump(module, optimizer, a.out / "loaded.pt", a.rank)
    for step in range(start, a.steps):
        losses[step + 1] = train_step(module, optimizer, step, a.rank, a.world)
        if step + 1 == a.save_at:
            extra = save_train_state(a.checkpoint, module, optimizer)
            if a.rank == 0:  # the non-tensor state, the same on every process
                torch.save(extra, a.checkpoint.parent / "extra.pt")
                (a.checkpoint.parent / "step.json").write_text(json.dumps({"step": step + 1}))
            dump(module, optimizer, a.out / "at-save.pt", a.rank)
            if a.world > 1:
                dist.barrier()
            if a.die:
                os.kill(os.getpid(), signal.SIGKILL)
    dump(module, optimizer, a.out / "final.pt", a.rank)
    if a.rank == 0:
        (a.out / "losses.json").write_text(json.dumps(losses))
    if a.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
