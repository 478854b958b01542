"""prefkd.training.checkpoint on its own: what a loss module keeps besides tensors (``get_extra_state`` returning plain
Python values) survives a save and a load, next to its tensors, the model, the optimizer and the scheduler. Under
DeepSpeed (a fake engine) every process saves and loads the engine's own state inside the atomic folder, and a
checkpoint of another engine is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn

from prefkd.losses.base import DistillationLoss
from prefkd.models.tiny import build_tiny
from prefkd.training import checkpoint as ckpt
from prefkd.training.distill_module import DistillModule


class LossWithExtraState(DistillationLoss):
    """A loss module with a tensor (a projector) and non-tensor state (a counter and a history list)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.calls, self.history = 0, []

    def get_extra_state(self) -> dict:
        return {"calls": self.calls, "history": list(self.history)}

    def set_extra_state(self, state: dict) -> None:
        self.calls, self.history = state["calls"], list(state["history"])


def test_non_tensor_loss_state_round_trips(tmp_path):
    acc = Accelerator(cpu=True)
    bundle = build_tiny("a", "llama", 16, num_layers=1, seed=0)
    loss = LossWithExtraState()
    loss.calls, loss.history = 7, [0.5, 0.25]
    params = list(bundle.model.parameters()) + list(loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    bundle.model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    dest = ckpt.save_checkpoint(tmp_path / "step-1", accelerator=acc, module=DistillModule(bundle.model, loss),
                                tokenizer=bundle.tokenizer, optimizer=optimizer, scheduler=scheduler,
                                state={"global_step": 1})
    assert (dest / ckpt.STATE_DIR / ckpt.LOSS_EXTRA).is_file() and (dest / ckpt.PROJECTORS).is_file()
    # each part keeps its own keys (checkpoints from before the student and the loss shared one module load as ever)
    assert set(load_file(str(dest / ckpt.PROJECTORS))) == {"proj.weight", "proj.bias"}
    assert set(load_file(str(dest / "model.safetensors"))) <= set(bundle.model.state_dict())

    fresh = LossWithExtraState()
    model = build_tiny("a", "llama", 16, num_layers=1, seed=5).model
    opt2 = torch.optim.AdamW(list(model.parameters()) + list(fresh.parameters()), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1.0)
    state = ckpt.load_checkpoint(dest, accelerator=acc, module=DistillModule(model, fresh), optimizer=opt2,
                                 scheduler=sched2)
    assert state == {"global_step": 1}
    assert fresh.calls == 7 and fresh.history == [0.5, 0.25]
    assert torch.equal(fresh.proj.weight, loss.proj.weight)
    for a, b in zip(model.parameters(), bundle.model.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


# ---------------------------------------------------------------- under DeepSpeed (a fake engine: DeepSpeed is not
# installed here; the same wiring ran on real DeepSpeed ZeRO-2/3 with 2 CPU processes, docs/operations.md)
class FakeDeepSpeedEngine(nn.Module):
    """What checkpoint.py calls on a prepared DeepSpeed engine: ``module`` (the DistillModule it wraps) and the
    engine's own checkpoint, each process writing and reading its ZeRO partition under ``<dir>/<tag>/``."""

    def __init__(self, module: nn.Module, rank: int):
        super().__init__()
        self.module, self.rank, self.saved, self.loaded = module, rank, [], []

    def partition(self, directory: str, tag: str) -> Path:
        return Path(directory) / tag / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        self.saved.append((save_dir, tag))
        self.partition(save_dir, tag).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": self.rank}, self.partition(save_dir, tag))

    def load_checkpoint(self, load_dir: str, tag: str, **options) -> tuple[str | None, dict]:
        self.loaded.append((load_dir, tag, options))
        assert torch.load(self.partition(load_dir, tag))["rank"] == self.rank  # its own partition
        return str(Path(load_dir) / tag), {}


class FakeDeepSpeedAccelerator:
    """One process of a DeepSpeed run, as checkpoint.py sees it; ``wait_for_everyone`` is a barrier of threads."""

    distributed_type = DistributedType.DEEPSPEED

    def __init__(self, rank: int, barrier):
        self.process_index, self.is_main_process, self.barrier = rank, rank == 0, barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=60)

    def get_state_dict(self, engine) -> dict:
        return engine.module.state_dict()

    def unwrap_model(self, engine):
        return engine.module


def on_every_process(world: int, fn) -> list:
    """``fn(rank, accelerator)`` on ``world`` threads that meet at each wait_for_everyone; their results."""
    import threading

    barrier, results, errors = threading.Barrier(world), [None] * world, []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, FakeDeepSpeedAccelerator(rank, barrier))
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_under_deepspeed_every_process_saves_and_loads_its_engine_state(tmp_path):
    bundle = build_tiny("a", "llama", 16, num_layers=1, seed=0)
    module = DistillModule(bundle.model, LossWithExtraState())
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engines = [FakeDeepSpeedEngine(module, rank) for rank in range(2)]
    rng = ckpt.rng_state()
    dest = tmp_path / "step-1"
    on_every_process(2, lambda rank, acc: ckpt.save_checkpoint(
        dest, accelerator=acc, module=engines[rank], tokenizer=bundle.tokenizer, optimizer=optimizer,
        scheduler=scheduler, state={"global_step": 1}))
    tmp_state = str(tmp_path / ".tmp-step-1" / ckpt.STATE_DIR / ckpt.DEEPSPEED_DIR)
    assert [e.saved for e in engines] == [[(tmp_state, ckpt.DEEPSPEED_TAG)]] * 2  # inside the tmp folder: atomic
    assert not (tmp_path / ".tmp-step-1").exists() and ckpt.find_latest(tmp_path) == dest
    state_dir = dest / ckpt.STATE_DIR
    assert sorted(p.name for p in (state_dir / ckpt.DEEPSPEED_DIR / ckpt.DEEPSPEED_TAG).iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (state_dir / ckpt.LEGACY_OPTIMIZER).exists() and not (state_dir / "dcp").exists()
    assert (dest / "model.safetensors").is_file()  # the gathered export stays

    fresh = [FakeDeepSpeedEngine(module, rank) for rank in range(2)]
    states = on_every_process(2, lambda rank, acc: ckpt.load_checkpoint(
        dest, accelerator=acc, module=fresh[rank], optimizer=optimizer, scheduler=scheduler))
    ckpt.set_rng_state(rng)
    assert states == [{"global_step": 1}] * 2
    options = {"load_optimizer_states": True, "load_lr_scheduler_states": False}  # prefkd steps its own scheduler
    assert [e.loaded for e in fresh] == [[(str(state_dir / ckpt.DEEPSPEED_DIR), ckpt.DEEPSPEED_TAG, options)]] * 2


def complete_checkpoint(path: Path, *parts: str) -> Path:
    """A checkpoint folder with state.json and the given files or folders (ending in /) under trainer_state/."""
    state = path / ckpt.STATE_DIR
    state.mkdir(parents=True)
    (state / "state.json").write_text('{"global_step": 3}')
    for part_ in parts:
        target = state / part_
        if part_.endswith("/"):
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
    return path


@pytest.mark.parametrize("parts,fragment", [
    ((ckpt.LEGACY_OPTIMIZER,), "resuming would restore the wrong optimizer state"),
    (("dcp/.metadata",), "resume it without DeepSpeed"),
])
def test_under_deepspeed_a_checkpoint_without_engine_state_is_refused(tmp_path, parts, fragment):
    path = complete_checkpoint(tmp_path / "step-3", *parts)
    engine = FakeDeepSpeedEngine(nn.Linear(1, 1), 0)
    with pytest.raises(ValueError, match=fragment) as info:
        on_every_process(1, lambda rank, acc: ckpt.load_checkpoint(path, accelerator=acc, module=engine,
                                                                     optimizer=None, scheduler=None))
    assert "trainer.resume=never" in str(info.value) and not engine.loaded


def test_a_deepspeed_checkpoint_is_refused_without_deepspeed(tmp_path):
    path = complete_checkpoint(tmp_path / "step-3", f"{ckpt.DEEPSPEED_DIR}/")
    with pytest.raises(ValueError, match="written under DeepSpeed"):
        ckpt.load_checkpoint(path, accelerator=Accelerator(cpu=True), module=nn.Linear(1, 1), optimizer=None,
                             scheduler=None)


def test_the_scheduler_steps_the_torch_optimizer_inside_the_wrappers():
    adamw = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3)
    zero = SimpleNamespace(optimizer=adamw)  # DeepSpeed's ZeRO optimizer is no torch Optimizer; its .optimizer is
    assert ckpt.torch_optimizer(SimpleNamespace(optimizer=zero)) is adamw  # Accelerate's wrapper around it
    assert ckpt.torch_optimizer(adamw) is adamw
