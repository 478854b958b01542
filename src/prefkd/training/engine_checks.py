"""The engine Accelerate built (one process, DDP, FSDP, DeepSpeed ZeRO) and the prefkd settings it cannot serve.

:func:`describe_engine` reads what the Accelerate state says about the engine into an :class:`Engine` right after the
``Accelerator`` is built; :func:`check_engine` (pure) refuses, before any model loads, each combination that cannot
train correctly, naming the key to change and how:

* DeepSpeed's own ``gradient_accumulation_steps`` ≠ 1: prefkd accumulates micro-batches itself
  (``trainer.gradient_accumulation_steps``) and normalises the loss over the whole step; DeepSpeed's would divide
  the loss again and step at its own boundaries.
* DeepSpeed's ``gradient_clipping`` ≠ ``trainer.max_grad_norm``: under DeepSpeed only DeepSpeed clips (inside
  ``engine.step()``, which ``accelerator.backward`` runs); ``accelerator.clip_grad_norm_`` returns DeepSpeed's norm
  and clips nothing, so DeepSpeed's value would silently win.
* ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``: every checkpoint writes a gathered
  ``from_pretrained`` export, which ``accelerator.get_state_dict`` cannot build then (the first save would fail).
* ZeRO-3 with a model DeepSpeed partitions but never runs (:func:`check_zero3_models`, once the loss says what it
  needs): a teacher, or the frozen copy of a full student that ``reference=initial`` makes.
* A student sharded across processes (FSDP, ZeRO-3) with generation that is not collective: dev ROUGE-L
  (``trainer.eval.rouge``) generates on the main process only, and on-policy sampling
  (``trainer.on_policy.fraction``) draws a different number of tokens on each process; each forward pass of a
  sharded model gathers its parameters from every process, so the processes would wait on each other forever.

:func:`fill_deepspeed_batch_size` sets DeepSpeed's ``train_micro_batch_size_per_gpu`` to ``trainer.batch_size``
when the config leaves it ``auto``: prefkd prepares no DataLoader, from which Accelerate would read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelerate.utils import DistributedType

__all__ = ["Engine", "check_engine", "check_sharded_models", "describe_engine", "engine_from_plugin",
           "fill_deepspeed_batch_size"]

# Where each DeepSpeed value is set: the key of an accelerate config file's deepspeed_config, and of a DeepSpeed JSON.
ACCELERATE_KEY = {"gradient_accumulation_steps": "deepspeed_config.gradient_accumulation_steps",
                  "gradient_clipping": "deepspeed_config.gradient_clipping",
                  "gather": "deepspeed_config.zero3_save_16bit_model"}
DEEPSPEED_KEY = {"gradient_accumulation_steps": "gradient_accumulation_steps",
                 "gradient_clipping": "gradient_clipping",
                 "gather": "zero_optimization.stage3_gather_16bit_weights_on_model_save"}


@dataclass(frozen=True)
class Engine:
    """What trains the student, as the Accelerate state describes it. The DeepSpeed fields are the values DeepSpeed
    will run with (``auto`` resolved as Accelerate resolves it at ``prepare``); None without DeepSpeed."""

    kind: str                                        # accelerate's DistributedType: NO, MULTI_GPU, FSDP, DEEPSPEED…
    processes: int = 1                               # processes in the run (all machines)
    zero_stage: int | None = None                    # DeepSpeed ZeRO stage 0–3
    gradient_accumulation_steps: int | None = None   # DeepSpeed's own micro-steps per optimizer step
    gradient_clipping: float | None = None           # DeepSpeed's max gradient norm (0: no clipping)
    gather_16bit_on_save: bool | None = None         # ZeRO-3: gather the full weights for a save
    offload_optimizer: str | None = None             # DeepSpeed optimizer-state offload: none | cpu | nvme
    offload_param: str | None = None                 # DeepSpeed parameter offload (ZeRO-3): none | cpu | nvme
    micro_batch_size: int | str | None = None        # DeepSpeed's train_micro_batch_size_per_gpu (or "auto")
    cpu_ram_efficient_loading: bool | None = None    # FSDP: weights loaded on process 0 only, broadcast at prepare

    @property
    def deepspeed(self) -> bool:
        return self.kind == DistributedType.DEEPSPEED.value

    @property
    def name(self) -> str:
        """How the docs and messages call it: DeepSpeed ZeRO-N, FSDP, DDP, one process."""
        if self.deepspeed:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return {"FSDP": "FSDP", "NO": "one process"}.get(self.kind, f"DDP ({self.kind})")

    @property
    def sharded(self) -> bool:
        """The student's parameters are split across processes (FSDP, or DeepSpeed ZeRO stage 3)."""
        return self.kind == DistributedType.FSDP.value or (self.deepspeed and self.zero_stage == 3)


def _resolved(value, auto, absent):
    """A DeepSpeed config value as DeepSpeed will see it: ``auto`` → what Accelerate fills, missing → DeepSpeed's
    default."""
    return absent if value is None else auto if value == "auto" else value


def engine_from_plugin(kind, processes: int, plugin=None, fsdp_plugin=None) -> Engine:
    """The :class:`Engine` of ``kind`` (a DistributedType) on ``processes``; ``plugin``: Accelerate's
    ``DeepSpeedPlugin`` under DeepSpeed (its ``deepspeed_config``, with what the accelerate config and its
    ``ACCELERATE_*`` environment filled in); ``fsdp_plugin``: its ``FullyShardedDataParallelPlugin`` under FSDP."""
    kind = DistributedType(kind).value
    if plugin is None:
        efficient = None if fsdp_plugin is None else bool(getattr(fsdp_plugin, "cpu_ram_efficient_loading", False))
        return Engine(kind=kind, processes=int(processes), cpu_ram_efficient_loading=efficient)
    get = plugin.get_value
    return Engine(
        kind=kind, processes=int(processes), zero_stage=int(_resolved(get("zero_optimization.stage"), 0, 0)),
        # auto: Accelerate fills its own gradient_accumulation_steps, which prefkd leaves at 1
        gradient_accumulation_steps=int(_resolved(get("gradient_accumulation_steps"), 1, 1)),
        # auto: Accelerate fills 1.0 at prepare; missing: DeepSpeed's default 0 (no clipping)
        gradient_clipping=float(_resolved(get("gradient_clipping"), 1.0, 0.0)),
        gather_16bit_on_save=bool(_resolved(get("zero_optimization.stage3_gather_16bit_weights_on_model_save"),
                                            False, False)),
        offload_optimizer=str(get("zero_optimization.offload_optimizer.device") or "none"),
        offload_param=str(get("zero_optimization.offload_param.device") or "none"),
        micro_batch_size=get("train_micro_batch_size_per_gpu"))


def describe_engine(accelerator) -> Engine:
    """The :class:`Engine` of a built ``Accelerator`` (its state: distributed type, processes, DeepSpeed plugin)."""
    kind = accelerator.distributed_type
    plugin = accelerator.state.deepspeed_plugin if kind == DistributedType.DEEPSPEED else None
    fsdp_plugin = accelerator.state.fsdp_plugin if kind == DistributedType.FSDP else None
    return engine_from_plugin(kind, accelerator.num_processes, plugin, fsdp_plugin)


def _grad_norm_problem(engine: Engine, max_grad_norm) -> str | None:
    """DeepSpeed clips with its own gradient_clipping and nothing else does: it must equal trainer.max_grad_norm
    (null ↔ 0, no clipping)."""
    wanted = float(max_grad_norm) if max_grad_norm else 0.0
    if engine.gradient_clipping == wanted:
        return None
    return (f"DeepSpeed gradient_clipping={engine.gradient_clipping:g} but trainer.max_grad_norm={max_grad_norm}: "
            f"under DeepSpeed only DeepSpeed clips (inside engine.step(); accelerator.clip_grad_norm_ returns "
            f"DeepSpeed's norm and clips nothing), so DeepSpeed's value would win. Make them agree: set "
            f"{ACCELERATE_KEY['gradient_clipping']}: {wanted:g} in the accelerate config (--config_file; "
            f"{DEEPSPEED_KEY['gradient_clipping']} in a DeepSpeed JSON; 0 = no clipping, as "
            f"trainer.max_grad_norm=null), or trainer.max_grad_norm={engine.gradient_clipping or 'null'}")


def _deepspeed_problems(engine: Engine, tcfg) -> list[str]:
    """The DeepSpeed settings prefkd's loop cannot run with."""
    problems = []
    if engine.gradient_accumulation_steps != 1:
        problems.append(
            f"DeepSpeed gradient_accumulation_steps={engine.gradient_accumulation_steps}: prefkd accumulates "
            f"micro-batches itself and normalises the loss over the whole step; DeepSpeed's would divide the loss "
            f"again and step at its own boundaries. Set {ACCELERATE_KEY['gradient_accumulation_steps']}: 1 in the "
            f"accelerate config ({DEEPSPEED_KEY['gradient_accumulation_steps']}: 1 in a DeepSpeed JSON) and "
            f"trainer.gradient_accumulation_steps="
            f"{engine.gradient_accumulation_steps * int(tcfg.gradient_accumulation_steps)} instead")
    clipping = _grad_norm_problem(engine, tcfg.get("max_grad_norm"))
    if clipping:
        problems.append(clipping)
    if engine.zero_stage == 3 and not engine.gather_16bit_on_save:
        problems.append(
            f"DeepSpeed ZeRO-3 without {DEEPSPEED_KEY['gather']}: every checkpoint (step-N, best/, last/) writes the "
            f"full weights for from_pretrained, which ZeRO-3 cannot gather then, so the first save would fail after "
            f"training to it. Set zero3_save_16bit_model: true under deepspeed_config in the accelerate config "
            f"({DEEPSPEED_KEY['gather']}: true in a DeepSpeed JSON)")
    return problems


def _sharded_generation_problems(engine: Engine, tcfg) -> list[str]:
    """Generation that not every process runs in step: a hang when the student is sharded across processes."""
    if not engine.sharded or engine.processes < 2:
        return []
    why = (f"under {engine.name} on {engine.processes} processes every forward pass of the student gathers its "
           f"parameters from all processes")
    problems = []
    if (tcfg.get("eval") or {}).get("rouge"):
        problems.append(f"trainer.eval.rouge=true: dev ROUGE-L generates on the main process only, but {why}: the "
                        f"others would never join and the run would hang. Set trainer.eval.rouge=false (select by "
                        f"dev loss; evaluate ROUGE-L after training with prefkd.evaluate or final_eval)")
    fraction = (tcfg.get("on_policy") or {}).get("fraction") or 0
    if fraction > 0:
        problems.append(f"trainer.on_policy.fraction={fraction}: each process samples responses of its own length, "
                        f"but {why}: a process that stops sampling early leaves the others waiting and the run "
                        f"would hang. Set trainer.on_policy.fraction=0, or train with DDP or DeepSpeed ZeRO-1/2")
    return problems


def _fsdp_problems(engine: Engine) -> list[str]:
    """The FSDP settings prefkd cannot run with."""
    if not engine.cpu_ram_efficient_loading:
        return []
    return ["FSDP with fsdp_cpu_ram_efficient_loading: every process but the first loads the student (and, through "
            "transformers, the teacher) without weights, expecting them at prepare; prefkd reads the loaded models "
            "before (the fused-head probe, a reference copy, the teacher, which is never prepared). Set "
            "fsdp_config.fsdp_cpu_ram_efficient_loading: false in the accelerate config"]


def check_engine(engine: Engine, cfg) -> None:
    """Raise ValueError naming every setting of ``cfg`` (the composed train config) that ``engine`` cannot train
    with, and the fix of each."""
    tcfg = cfg.trainer
    problems = _deepspeed_problems(engine, tcfg) if engine.deepspeed else _fsdp_problems(engine)
    problems += _sharded_generation_problems(engine, tcfg)
    if problems:
        raise ValueError(f"{engine.name} on {engine.processes} process(es) cannot run this configuration:\n- "
                         + "\n- ".join(problems))


def _loads_teacher_model(needs, teacher_cache) -> bool:
    """Whether the pipeline loads the teacher model: the loss runs it (live, or beside a hidden-state cache for its
    head) or uses it as reference; a top-k cache replaces it."""
    topk_cache = teacher_cache is not None and teacher_cache.store == "topk"
    return (needs.teacher and not topk_cache) or needs.reference == "teacher"


def check_sharded_models(engine: Engine, needs, cfg, teacher_cache=None) -> None:
    """Refuse, before any model loads, the models a sharded student's engine cannot serve.

    Under FSDP, a LoRA student's ``reference=initial`` (the student run with its adapter disabled, outside the
    prepared module's forward, where FSDP gathers the parameters its top unit holds: embedding, head). Under DeepSpeed
    ZeRO-3, a model that DeepSpeed partitions but never runs.
    transformers partitions every model ``from_pretrained`` loads after the Accelerator exists (``zero.Init``;
    Accelerate 1.16 registers the ZeRO-3 config with transformers whatever ``zero3_init_flag`` says), and DeepSpeed
    gathers the weights only of the module it prepares, the student: a teacher would have empty weights at its first
    forward pass, and so would the frozen copy a full student's ``reference=initial`` makes after partitioning.
    ``needs``: the loss's :class:`~prefkd.losses.base.Needs`; ``teacher_cache``: the run's TeacherCache or None."""
    if engine.kind == DistributedType.FSDP.value and needs.reference == "initial" and cfg.student.get("lora"):
        raise ValueError("FSDP with loss.reference=initial and a LoRA student: the reference is the student run with "
                         "its adapter disabled outside the sharded module's forward, where FSDP does not gather the "
                         "parameters of its top unit (embedding, head). Use a full student (its frozen copy is made "
                         "before sharding), loss.reference=precomputed (python -m prefkd.reference_logps), or DDP / "
                         "DeepSpeed ZeRO-2")
    if not (engine.deepspeed and engine.zero_stage == 3):
        return
    instead = ("deepspeed_config.zero_stage: 2 in the accelerate config (config/accelerate/deepspeed_zero2.yaml: "
               "optimizer state and gradients sharded) or FSDP (config/accelerate/fsdp.yaml)")
    target = cfg.loss.get("_target_")
    if _loads_teacher_model(needs, teacher_cache):
        raise ValueError(f"DeepSpeed ZeRO-3 with a teacher model (loss {target} runs it): transformers partitions "
                         f"every model loaded under ZeRO-3, and DeepSpeed gathers the weights only of the student it "
                         f"prepares, so the teacher would have empty weights at its first forward pass. Use "
                         f"{instead}; a logit-based loss (kd, uld, minedit, multilevel_ot) can instead read a top-k "
                         f"teacher cache (trainer.teacher_cache)")
    if needs.reference == "initial" and not cfg.student.get("lora"):
        raise ValueError(f"DeepSpeed ZeRO-3 with loss.reference=initial and a full (non-LoRA) student: the frozen "
                         f"reference is a copy of the student made after DeepSpeed partitioned it, so it holds no "
                         f"weights. Use {instead}, a LoRA student (student.lora: the reference is the base with the "
                         f"adapter disabled), or loss.reference=precomputed (python -m prefkd.reference_logps)")


def fill_deepspeed_batch_size(accelerator, batch_size: int) -> None:
    """Under DeepSpeed, set ``train_micro_batch_size_per_gpu`` to ``trainer.batch_size`` where the config leaves it
    ``auto``: Accelerate reads it from a prepared DataLoader, and prefkd prepares none (its loader is its own)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = int(batch_size)
