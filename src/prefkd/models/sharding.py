"""A frozen model sharded across processes: the sharded teacher of issue 18 (``teacher.shard=true``).

A teacher runs under ``no_grad`` and never steps, so sharding it costs no optimizer state and no gradients: only
its parameters are split. :func:`shard_frozen` applies FSDP2 (``torch.distributed.fsdp.fully_shard``) over all
processes of the default group:

- each decoder layer (the classes of transformers' ``_no_split_modules``) is its own unit, then the whole model;
  every unit, the root included, gives its gathered parameters back after its forward
  (``reshard_after_forward=True``; FSDP's default keeps the root's gathered for a backward that a frozen model never
  runs), so a forward holds one layer whole at a time;
- the **input embedding and the output head stay whole** on every process (FSDP's ``ignored_params``): the losses
  read them outside the forward, chunk by chunk (DSKD's projections and cross-model attention, the fused heads'
  per-chunk logits), and whole tables cost no collective at all, where gathered ones would cost one per read. They
  are a few per cent of a large model (Llama-3-70B: 2 × 128,256 × 8,192 of 70.6 B parameters, 3 %);
- ``offload_to_cpu``: the layers' shards live in CPU memory and are copied to the device one layer at a time
  (``CPUOffloadPolicy``); the whole tables stay on the device.

Engine-agnostic: it needs a process group (torchrun, ``accelerate launch``) and nothing from Accelerate, so the same
function runs under the CPU tests (gloo) and on GPUs (NCCL).
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (instances of transformers' ``_no_split_modules`` classes: ``LlamaDecoderLayer``,
    ``GPT2Block``, ...), in order; empty when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def whole_tables(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output head modules, which :func:`shard_frozen` keeps whole (a tied head is
    either the embedding module itself or a second module over the same parameter)."""
    tables = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head is not tables[0]:
        tables.append(head)
    return tables


def is_sharded(model: nn.Module) -> bool:
    """``model`` was sharded by FSDP2 (:func:`shard_frozen`): its placement is FSDP's, not a ``.to(device)``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def on_device(model: nn.Module, device) -> nn.Module:
    """``model`` moved to ``device``, unless it is sharded (FSDP places its shards, on the device or the CPU)."""
    return model if is_sharded(model) else model.to(device)


def shard_frozen(model: nn.Module, *, device, offload_to_cpu: bool = False) -> nn.Module:
    """Shard the frozen ``model`` (eval mode, no gradients) over every process of the default process group, in
    place; returns it. ``device``: this process's compute device (``cuda:k`` or ``cpu``); the whole tables are moved
    there. See the module docstring for what is sharded. Collective: every process calls it on the same model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_frozen needs a process group: launch with torchrun or accelerate launch")
    model.eval().requires_grad_(False)
    tables = whole_tables(model)
    for table in tables:
        table.to(device)
    ignored = {p for table in tables for p in table.parameters()}
    mesh = init_device_mesh(device.type if hasattr(device, "type") else str(device).split(":")[0],
                            (dist.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=str(device).startswith("cuda")) if offload_to_cpu else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, offload_policy=offload, ignored_params=ignored)
    return model


def local_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole model's parameters): a sharded parameter counts
    its local shard, a whole one its full size."""
    held = total = 0
    for p in model.parameters():
        size = p.element_size()
        total += p.numel() * size
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * size
    return held, total
