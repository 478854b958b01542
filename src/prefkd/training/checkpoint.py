"""Checkpoints: written atomically, loadable with ``from_pretrained``, complete enough to resume exactly.

Layout of ``<run>/checkpoints/<name>/`` (name = ``step-N``, ``last`` or ``best``)::

    config.json + model.safetensors   (full model)   or   adapter_config.json + adapter_model.safetensors (LoRA)
    tokenizer files
    projectors.safetensors            the loss's own modules and state (projectors, cost weights), if any
    trainer_state/                    dcp/ or deepspeed/, loss_extra.pt, scheduler.pt, rng-<rank>.pt, state.json

The first three are a gathered export for ``from_pretrained`` users (``best/``, ``last/``). Resuming reads the
training state instead: ``trainer_state/dcp/`` holds the prepared module's parameters (student and loss) and the
optimizer's state as every process's shards (:mod:`prefkd.training.train_state`, ``torch.distributed.checkpoint``), so
a run sharded by FSDP resumes its own optimizer state, on any number of processes. Under DeepSpeed (its engine and
ZeRO optimizer are not torch modules and optimizers that ``torch.distributed.checkpoint`` reads) every process writes
the engine's own checkpoint instead, ``trainer_state/deepspeed/`` (``engine.save_checkpoint``: the module's weights and
each process's ZeRO partition of the optimizer state), and a resume loads it with ``engine.load_checkpoint``; DeepSpeed
itself refuses another number of processes. Checkpoints of older prefkd versions (``trainer_state/optimizer.pt``, no
``dcp/``) resume as before without DeepSpeed: the weights from the export, the optimizer from ``optimizer.pt``. Under
DeepSpeed they are refused: ``optimizer.pt`` is one process's ZeRO partition, not the optimizer's state.
``make test`` runs the DeepSpeed path on a fake engine (DeepSpeed is not installed); by hand it resumed exactly on
DeepSpeed 0.19.8, ZeRO-2 and ZeRO-3 on 2 CPU processes (docs/operations.md, "Multi-GPU and multi-node").

A checkpoint is written into ``.tmp-<name>`` and renamed into place, so a kill at any moment leaves the
previous one intact; ``find_latest`` only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from prefkd.training.distill_module import part
from prefkd.training.train_state import DCP_DIR, has_train_state, load_train_state, save_train_state

STATE_DIR = "trainer_state"
PROJECTORS = "projectors.safetensors"
LOSS_EXTRA = "loss_extra.pt"  # non-tensor loss-module state (torch.save, loaded weights_only)
LEGACY_OPTIMIZER = "optimizer.pt"  # the main process's optimizer.state_dict(): older checkpoints
DEEPSPEED_DIR = "deepspeed"  # under trainer_state/: the DeepSpeed engine's own checkpoint (every process's partition)
DEEPSPEED_TAG = "engine"  # its tag (the folder inside DEEPSPEED_DIR that holds the files)


def _deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside the wrappers: Accelerate's (``AcceleratedOptimizer.optimizer``) and, under DeepSpeed,
    the ZeRO optimizer's (``.optimizer``: the AdamW whose parameter groups, and learning rates, it steps)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _atomic_replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``; an existing ``dest`` is swapped out first, then deleted."""
    old = dest.with_name(f".old-{dest.name}")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 0, 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_loss_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for safetensors, everything else) of a loss module's state_dict (``*._extra_state`` entries)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}


def save_checkpoint(dest: Path, *, accelerator, module, tokenizer, optimizer, scheduler, state: dict) -> Path:
    """Save everything needed to continue training into ``dest`` (atomically). Collective: all ranks call.
    ``module``: the prepared :class:`~prefkd.training.distill_module.DistillModule`; the student's weights go to
    ``save_pretrained``'s files and the loss's to ``projectors.safetensors``, each with its own keys (gathered, by
    the main process); the module and the optimizer, sharded as they are, to ``trainer_state/dcp/`` (every
    process), or under DeepSpeed the engine's checkpoint to ``trainer_state/deepspeed/`` (every process)."""
    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(module)  # collective under FSDP / DeepSpeed
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(module).student
        student.save_pretrained(tmp, state_dict=part(full_state, "student"), safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        loss_state, loss_extra = split_loss_state(part(full_state, "loss"))
        if loss_state:
            save_file(loss_state, str(tmp / PROJECTORS))
        if loss_extra:  # non-tensor module state (get_extra_state: e.g. an inner optimizer's state)
            torch.save(loss_extra, tmp / STATE_DIR / LOSS_EXTRA)
        torch.save(scheduler.state_dict(), tmp / STATE_DIR / "scheduler.pt")
    accelerator.wait_for_everyone()
    if _deepspeed(accelerator):  # collective: every process writes its ZeRO partition
        module.save_checkpoint(str(tmp / STATE_DIR / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    else:  # collective: every process writes its shards
        save_train_state(tmp / STATE_DIR / DCP_DIR, module, torch_optimizer(optimizer))
    torch.save(rng_state(), tmp / STATE_DIR / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # state.json last: its presence marks the checkpoint complete.
        (tmp / STATE_DIR / "state.json").write_text(json.dumps(state, indent=2))
        _atomic_replace_dir(tmp, dest)
    accelerator.wait_for_everyone()
    return dest


def link_checkpoint(src: Path, dest: Path) -> None:
    """Make ``dest`` a copy of ``src`` with hard links (no extra disk), atomically."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, copy_function=os.link)
    except OSError:  # a file system without hard links
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    _atomic_replace_dir(tmp, dest)


def is_adapter(path: str | Path) -> bool:
    """A LoRA checkpoint (peft adapter: adapter_config.json), as opposed to a full model."""
    return (Path(path) / "adapter_config.json").is_file()


def is_complete(path: Path) -> bool:
    return (Path(path) / STATE_DIR / "state.json").is_file()


def read_state(path: Path) -> dict:
    """The ``state.json`` of a complete checkpoint (its TrainState)."""
    return json.loads((Path(path) / STATE_DIR / "state.json").read_text())


def find_latest(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the highest global step under ``checkpoint_dir`` (or None)."""
    best, best_step = None, -1
    if not Path(checkpoint_dir).is_dir():
        return None
    for child in Path(checkpoint_dir).iterdir():
        if child.name.startswith(".") or not is_complete(child):
            continue
        step = read_state(child)["global_step"]
        # prefer step-N over its `last`/`best` twins at equal step (same content)
        if step > best_step or (step == best_step and re.fullmatch(r"step-\d+", child.name)):
            best, best_step = child, step
    return best


def load_model_weights(model, path: Path) -> None:
    """Load the weights saved by ``save_checkpoint`` into ``model`` (full model or peft adapter)."""
    path = Path(path)
    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.name != PROJECTORS:
            state.update(load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"{path} holds no model weights (*.safetensors).")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - {
        name for name, p in model.named_parameters()}
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_checkpoint(path: Path, *, accelerator, module, optimizer, scheduler) -> dict:
    """Restore weights, projectors, optimizer, scheduler and RNG from ``path`` into the prepared
    :class:`~prefkd.training.distill_module.DistillModule` ``module`` and the rest; return its state.json.
    Collective (every process loads its shards of ``trainer_state/dcp/``, or under DeepSpeed its partition of
    ``trainer_state/deepspeed/``). A checkpoint of another engine is refused (:func:`_check_engine_matches`)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete prefkd checkpoint (no {STATE_DIR}/state.json).")
    extra_file = path / STATE_DIR / LOSS_EXTRA
    loss_extra = torch.load(extra_file, map_location="cpu", weights_only=True) if extra_file.exists() else {}
    _check_engine_matches(path, _deepspeed(accelerator))
    if _deepspeed(accelerator):  # the engine's weights (student and loss, extra state included) and ZeRO partition
        load_path, _ = module.load_checkpoint(str(path / STATE_DIR / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"{path / STATE_DIR / DEEPSPEED_DIR}: DeepSpeed found no checkpoint "
                                    f"{DEEPSPEED_TAG!r} to load")
    elif has_train_state(path / STATE_DIR / DCP_DIR):
        load_train_state(path / STATE_DIR / DCP_DIR, module, torch_optimizer(optimizer),
                         extra={f"loss.{k}": v for k, v in loss_extra.items()})
    else:  # an older checkpoint: the weights from the export, the optimizer from optimizer.pt
        _load_legacy(path, accelerator.unwrap_model(module), optimizer, loss_extra)
    scheduler.load_state_dict(torch.load(path / STATE_DIR / "scheduler.pt", weights_only=True))
    rng_file = path / STATE_DIR / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return read_state(path)


def _check_engine_matches(path: Path, deepspeed: bool) -> None:
    """A checkpoint's training state resumes only under the engine that wrote it: DeepSpeed's engine checkpoint
    under DeepSpeed, ``dcp/`` (or an older ``optimizer.pt``) without. Otherwise the error says how to go on."""
    state = path / STATE_DIR
    written_by_deepspeed = (state / DEEPSPEED_DIR).is_dir()
    restart = (f"or start a new run from its weights (student=checkpoint student.path={path}, or for a LoRA "
               f"adapter student.adapter={path} on its base; trainer.resume=never): the optimizer starts afresh")
    if deepspeed and not written_by_deepspeed:
        if has_train_state(state / DCP_DIR):
            raise ValueError(f"trainer.resume: {path} holds torch.distributed.checkpoint shards "
                             f"({STATE_DIR}/{DCP_DIR}/), not a DeepSpeed engine checkpoint "
                             f"({STATE_DIR}/{DEEPSPEED_DIR}/); resume it without DeepSpeed (one process, DDP or FSDP), "
                             f"{restart}")
        raise ValueError(f"trainer.resume: {path} holds an older prefkd's {STATE_DIR}/{LEGACY_OPTIMIZER} (the main "
                         f"process's optimizer state: under DeepSpeed only its own ZeRO partition), not a DeepSpeed "
                         f"engine checkpoint ({STATE_DIR}/{DEEPSPEED_DIR}/): resuming would restore the wrong "
                         f"optimizer state; {restart[3:]}")
    if not deepspeed and written_by_deepspeed:
        raise ValueError(f"trainer.resume: {path} was written under DeepSpeed ({STATE_DIR}/{DEEPSPEED_DIR}/: each "
                         f"process's ZeRO partition); resume it under DeepSpeed on as many processes, {restart}")


def _load_legacy(path: Path, inner, optimizer, loss_extra: dict) -> None:
    """A checkpoint without ``trainer_state/dcp/``: the student's and the loss's weights from the export into the
    unwrapped module ``inner``, the optimizer from ``optimizer.pt`` (the main process's state dict)."""
    load_model_weights(inner.student, path)
    loss_state = load_file(str(path / PROJECTORS)) if (path / PROJECTORS).exists() else {}
    loss_state.update(loss_extra)
    if loss_state:
        inner.loss.load_state_dict(loss_state)
    optimizer.load_state_dict(torch.load(path / STATE_DIR / LEGACY_OPTIMIZER, map_location="cpu", weights_only=True))
