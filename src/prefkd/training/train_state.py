"""The training state of a checkpoint, engine-agnostic: the parameters of the prepared module (student and the loss's
modules) and the optimizer, through ``torch.distributed.checkpoint`` (DCP).

``get_state_dict(module, optimizer)`` gives both with canonical keys (the plain module's parameter names, whether the
module is plain, DDP-wrapped or sharded by FSDP/``fully_shard``), each process holding only its own shards (DTensors
under FSDP2). ``dcp.save`` writes every process's shards into one folder (a collective: every process calls it) with
a metadata file that maps the global tensors to the files; ``dcp.load`` reads back exactly the pieces the loading
processes own, so a checkpoint written by N processes resumes on M (1 ↔ 2 in the tests). Without a process group
both run in the one process.

Saved (the folder ``trainer_state/dcp/`` of a checkpoint)::

    model.<name>       every trainable parameter (once, under its first name when tied) and every buffer of the
                       module (frozen parameters, e.g. a LoRA student's base weights, are rebuilt from the
                       pretrained model on resume, as before)
    optimizer.state.<name>.<key>, optimizer.param_groups   the optimizer's state by parameter name; absent while the
                       optimizer has taken no step (reading it would initialise it with a step of lr 0, which
                       changes AdamW's step count)

Non-tensor module state (``get_extra_state``) is not saved here: it is the same on every process and goes with the
checkpoint's other files (:mod:`prefkd.training.checkpoint`); :func:`load_train_state` takes it back in ``extra``.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

DCP_DIR = "dcp"
OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _not_saved(module: nn.Module) -> set[str]:
    """The canonical names of the parameters not saved: the frozen ones (``ignore_frozen_params`` drops only a tied
    parameter's first name: a LoRA student's frozen output head, tied to its embedding, would stay) and the second
    names of tied ones (the first holds the tensor: loading it restores both)."""
    first = {name for name, _ in module.named_parameters()}
    names = {name for name, p in module.named_parameters(remove_duplicate=False)
             if not p.requires_grad or name not in first}
    return names | {n.removeprefix("module.").replace("_orig_mod.", "") for n in names}  # DDP's and compile's


def _split(module: nn.Module, state: dict) -> tuple[dict, dict]:
    """(the tensors to save: parameters that train and buffers; the non-tensor ``*._extra_state`` values) of a module
    state dict from ``get_state_dict``."""
    skip = _not_saved(module)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k not in skip}
    return tensors, {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}


def _distributed() -> bool:
    """A process group is up: DCP coordinates the processes through it (else it reads and writes alone)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _alone_quietly():
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def has_train_state(directory: Path) -> bool:
    """``directory`` holds a DCP training state (its metadata file is written last by ``dcp.save``)."""
    return (Path(directory) / ".metadata").is_file()


def save_train_state(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Write ``module``'s parameters and buffers and ``optimizer``'s state into ``directory`` (collective: every
    process calls, each writes its shards). ``module``: plain, DDP-wrapped or FSDP-sharded; ``optimizer``: a
    ``torch.optim.Optimizer`` over its parameters (not a wrapper). Returns the non-tensor module state (``extra``),
    which the caller saves beside."""
    if optimizer.state:
        model_state, optim_state = get_state_dict(module, optimizer, options=OPTIONS)
    else:  # no step yet: leave the optimizer untouched (see the module docstring)
        model_state, optim_state = get_model_state_dict(module, options=OPTIONS), None
    tensors, extra = _split(module, model_state)
    state = {"model": tensors} | ({"optimizer": optim_state} if optim_state is not None else {})
    with _alone_quietly():
        dcp.save(state, checkpoint_id=str(directory), no_dist=not _distributed())
    return extra


def _saved_keys(directory: Path) -> set[str]:
    """The flattened keys (``model.<name>``, ``optimizer.state.<name>.<key>``, ...) of a saved training state."""
    return set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def _only_saved(optim_state: dict, saved: set[str]) -> dict:
    """The optimizer template without the entries the checkpoint lacks: parameters that had no state when it was
    saved (no gradient yet, e.g. a loss module that trains by its own inner steps) keep none after loading."""
    state = {name: {k: v for k, v in entries.items() if f"optimizer.state.{name}.{k}" in saved}
             for name, entries in optim_state["state"].items()}
    return {**optim_state, "state": {name: entries for name, entries in state.items() if entries}}


def load_train_state(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                     extra: dict | None = None) -> None:
    """Restore what :func:`save_train_state` wrote into ``module`` and ``optimizer`` (collective), on any number of
    processes and any sharding of ``module``. ``extra``: its non-tensor module state. An optimizer that had taken no
    step when saved is left as it is (fresh)."""
    saved = _saved_keys(directory)
    with_optimizer = any(key.startswith("optimizer.") for key in saved)
    if with_optimizer:  # the template: this process's shards, in the shapes and placements they have here
        model_state, optim_state = get_state_dict(module, optimizer, options=OPTIONS)
        optim_state = _only_saved(optim_state, saved)
    else:
        model_state, optim_state = get_model_state_dict(module, options=OPTIONS), None
    tensors, _ = _split(module, model_state)
    state = {"model": tensors} | ({"optimizer": optim_state} if with_optimizer else {})
    with _alone_quietly():  # in place: each process reads the pieces it holds
        dcp.load(state, checkpoint_id=str(directory), no_dist=not _distributed())
    model_state = state["model"] | (extra or {})
    if with_optimizer:
        result = set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=state["optimizer"],
                                options=OPTIONS)
    else:
        result = set_model_state_dict(module, model_state, options=OPTIONS)
    _check_keys(module, result)


def read_train_state(directory: Path) -> dict:
    """The whole saved state, gathered into this process (no process group needed): ``{"model": {name: tensor},
    "optimizer": {"state": {name: {"step", "exp_avg", ...}}, "param_groups": [...]}}`` (to inspect a checkpoint)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp, _alone_quietly():
        dcp_to_torch_save(str(directory), f"{tmp}/state.pt")
        return torch.load(f"{tmp}/state.pt", weights_only=True)


def _check_keys(module: nn.Module, result) -> None:
    """Loaded non-strictly (frozen parameters and tied aliases are not saved): anything else missing or unexpected is
    an error."""
    skip = _not_saved(module)
    missing = [k for k in result.missing_keys if k not in skip]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the saved training state does not fit the module: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]}")
