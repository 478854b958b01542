"""The schemas of the config groups read as plain mappings: ``trainer`` (config/trainer/), ``dataset`` outside its
``source`` (config/dataset/), ``eval`` and ``final_eval`` (config/eval/), ``logger`` (config/logger/), and the keys
prefkd reads from a ``_target_`` node itself (``teacher.shard``, ``teacher.offload``).

Each field says what a key accepts (:mod:`prefkd.utils.config_schema`); the YAML files say what is chosen and why, so
the dataclasses hold no defaults. tests/test_fail_fast.py checks that the keys here and in the YAML files are the same.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefkd.models.loading import apply_lora
from prefkd.training.teacher_placement import OFFLOAD
from prefkd.utils.config_schema import OneOf, Target, join, key

DEVICE = dict(pattern=r"auto|cpu|cuda(:\d+)?|mps", form="auto, cpu, cuda or cuda:N")  # torch device names
DTYPE = Literal["float32", "bfloat16", "float16"]


# ------------------------------------------------------------------------------------------------ models
@dataclass
class TeacherPlacementKeys:
    """The teacher's keys that :func:`prefkd.training.teacher_placement.split_teacher_config` takes out."""

    shard: bool = key("shard the frozen teacher over the processes (FSDP2)", optional=True)
    offload: Literal[OFFLOAD] = key("a sharded teacher's layer shards in CPU memory", optional=True)


MODEL = Target(nested={"lora": apply_lora})  # student, reference, ...: a factory; lora: apply_lora's keys
OPTIONAL_MODEL = Target(nullable=("path",))  # reference, reward_model: path null = none
TEACHER = Target(extra=TeacherPlacementKeys, empty=True, nested={"lora": apply_lora})  # teacher=none: empty


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class TrainerEval:
    """``trainer.eval``: dev generation (ROUGE-L) at each dev evaluation."""

    rouge: bool = key("dev ROUGE-L at each evaluation (slow: it generates)")
    rouge_samples: int = key("sampled passes averaged", ge=1)
    no_repeat_ngram_size: int = key("no n-gram of this size repeats (0 = off)", ge=0)
    max_new_tokens: int = key("generation budget per answer", ge=1)
    rouge_limit: int | None = key("first N dev examples for ROUGE-L (null = all)", ge=1)


@dataclass
class OnPolicy:
    """``trainer.on_policy``: GKD's on-policy distillation (:mod:`prefkd.training.on_policy`)."""

    fraction: float = key("λ: probability that a step trains on the student's samples (0 = off)", ge=0, le=1)
    temperature: float = key("sampling temperature (0 = greedy)", ge=0)
    top_p: float = key("nucleus sampling mass", gt=0, le=1)
    max_new_tokens: int = key("sampled tokens per response at most", ge=1)
    every: int = key("toss the λ coin every N optimizer steps", ge=1)


@dataclass
class Trainer:
    """``trainer``: optimisation, evaluation and checkpoints (config/trainer/default.yaml)."""

    seed: int = key("seed of data order and dropout")
    device: Literal["auto", "cpu", "cuda"] = key("where the run trains (accelerate decides under a launcher)")
    precision: Literal["no", "fp16", "bf16"] = key("mixed precision")
    batch_size: int = key("per-device micro-batch", ge=1)
    gradient_accumulation_steps: int = key("micro-batches per optimizer step", ge=1)
    find_unused_parameters: bool = key("DDP: a step may leave a trainable parameter without gradient")
    max_epochs: int = key("passes over the training set", ge=1)
    max_steps: int | None = key("stop after this many optimizer steps (null = epochs decide)", ge=1)
    stop_at_step: int | None = key("save and stop early at this step, schedule unchanged", ge=1)
    lr: float = key("peak learning rate of the student", gt=0)
    projector_lr: float = key("learning rate of the loss's own modules", ge=0)
    weight_decay: float = key("AdamW decay", ge=0)
    adam_betas: list[float] = key("AdamW betas (β1, β2)", length=2)
    adam_eps: float = key("AdamW epsilon", gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = key("learning-rate schedule after the warm-up")
    warmup_steps: int = key("linear warm-up steps (when warmup_ratio is 0)", ge=0)
    warmup_ratio: float = key("warm-up as a fraction of all steps", ge=0, lt=1)
    max_grad_norm: float | None = key("gradient clipping (null = off)", gt=0, optional=True)
    max_nonfinite_in_a_row: int = key("stop after N skipped non-finite steps in a row (0 = never)", ge=0)
    group_by_length: bool = key("batches of similar length")
    eval_every: int | None = key("dev evaluation every N steps (null = each epoch)", ge=1)
    eval_at_start: bool = key("a dev evaluation before the first step")
    eval_batch_size: int = key("per-device dev batch", ge=1)
    dev_limit: int | None = key("use only the first N dev examples (null = all)", ge=1)
    select_metric: str = key("the metric that picks `best`", pattern=r"auto|dev/.+",
                             form="auto or a dev metric such as dev/loss, dev/ce or dev/rougeL")
    eval: TrainerEval = key("dev generation settings", optional=True)
    save_every: int | None = key("a step checkpoint every N steps (null = at each evaluation)", ge=1)
    keep_best: int = key("step checkpoints kept by select_metric (plus the newest)", ge=0)
    resume: str = key("auto | never | PATH of a checkpoint")
    log_every: int = key("steps between log lines", ge=1)
    compile: bool = key("torch.compile the student")
    fused_head: bool = key("losses get hidden states and the output head, never B×T×V logits", optional=True)
    teacher_cache: str | None = key("a `python -m prefkd.teacher_cache` folder (null = the live teacher)",
                                    optional=True)
    on_policy: OnPolicy = key("on-policy distillation", optional=True)
    num_threads: int | None = key("torch CPU threads (0 or null = torch's default)", ge=0)
    num_workers: int = key("DataLoader worker processes (0 = collate in the training process)", ge=0)
    prefetch_factor: int = key("micro-batches each worker collates ahead", ge=1)
    pin_memory: bool = key("pin collated batches for a fast copy to the GPU")


# ------------------------------------------------------------------------------------------------ dataset
@dataclass
class Dataset:
    """``dataset`` (config/dataset/): its ``source`` factory and how its records are tokenised."""

    source: MODEL = key("the factory of the train/dev/test records (prefkd.data.sources, ...)")
    kind: Literal["instruct", "preference"] = key("instruction records or preference pairs", optional=True)
    max_prompt_length: int = key("prompt tokens kept", ge=1)
    max_length: int = key("whole sequence budget: prompt + answer (+ EOS)", ge=2)
    eos_parent: bool = key("preference pairs: EOS is its own parent", optional=True)

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        prompt, whole = node["max_prompt_length"], node["max_length"]
        if prompt >= whole:
            return [f"{join(path, 'max_prompt_length')}={prompt} with {join(path, 'max_length')}={whole}: the "
                    f"prompt would fill the whole budget and leave no answer token; keep max_prompt_length below "
                    f"max_length"]
        return []


# ------------------------------------------------------------------------------------------------ logger
@dataclass
class NoLogger:
    """``logger=none``: metrics.jsonl only."""

    backend: Literal["none"] = key("no experiment tracker")


@dataclass
class WandbLogger:
    """``logger=wandb``: Weights & Biases (online with WANDB_API_KEY, else offline)."""

    backend: Literal["wandb"] = key("Weights & Biases")
    project: str | None = key("wandb project")
    entity: str | None = key("wandb team or user (null = your default)")
    group: str | None = key("run group")
    tags: list[str] = key("extra tags")
    mode: Literal["online", "offline", "disabled"] | None = key("null = online with a key, offline without")


LOGGER = OneOf("backend", {"none": NoLogger, "wandb": WandbLogger})


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class SamplingKeys:
    """Decoding settings (prefkd.eval.generation.Sampling; docs/methods.md §9)."""

    do_sample: bool = key("sample (false = greedy)")
    temperature: float = key("softmax temperature", gt=0)
    top_p: float = key("nucleus sampling mass (1.0 = off)", gt=0, le=1)
    top_k: int = key("top-k filtering (0 = off)", ge=0)
    no_repeat_ngram_size: int = key("no n-gram of this size repeats (0 = off)", ge=0)
    max_new_tokens: int = key("generated tokens at most", ge=1)
    max_prompt_length: int = key("prompt tokens kept", ge=1)


def check_sets(node, path: str, name_key: str) -> list[str]:
    """Each evaluated set (``node[name_key]``: one name or a list) is a key of ``sets`` or the path of a JSONL file."""
    names = node[name_key] if isinstance(node[name_key], str) else list(node[name_key])
    return [f"{join(path, name_key)}: {name!r} is neither a key of {join(path, 'sets')} ({', '.join(node['sets'])}) "
            f"nor the path of a JSONL file" for name in ([names] if isinstance(names, str) else names)
            if name not in node["sets"] and not str(name).endswith(".jsonl") and not Path(name).expanduser().is_file()]


@dataclass
class InstructEval(SamplingKeys):
    """``eval=instruct``: docs/methods.md §9, sampled answers scored by ROUGE-L."""

    protocol: Literal["instruct"] = key("the runner")
    datasets: list[str] = key("sets evaluated: keys of sets, or JSONL paths", nonempty=True)
    sets: dict[str, str | None] = key("set name -> JSONL file")
    seeds: list[int] = key("one generation pass per seed", nonempty=True)
    limit: int | None = key("the first N examples of each set (null = all)", ge=1)
    batch_size: int = key("prompts per generation batch", ge=1)

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        return check_sets(node, path, "datasets")


@dataclass
class NLLEval:
    """``eval=nll``: held-out NLL of the reference answers."""

    protocol: Literal["nll"] = key("the runner")
    datasets: list[str] = key("sets evaluated: keys of sets, or JSONL paths", nonempty=True)
    sets: dict[str, str | None] = key("set name -> JSONL file")
    limit: int | None = key("the first N examples of each set (null = all)", ge=1)
    batch_size: int = key("examples per forward pass", ge=1)
    max_prompt_length: int = key("prompt tokens kept", ge=1)
    max_length: int = key("prompt + answer + EOS tokens at most", ge=2)

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        return check_sets(node, path, "datasets") + Dataset.cross_check(node, path)


@dataclass
class WinRate:
    """``eval.win_rate``: the reward-model win rate's generation settings."""

    seed: int = key("sampling seed")
    limit: int | None = key("prompts used (null = all of eval.limit)", ge=1)
    max_new_tokens: int = key("generated tokens at most", ge=1)
    no_repeat_ngram_size: int = key("no n-gram of this size repeats (0 = off)", ge=0)
    max_prompt_length: int = key("prompt tokens kept (the last ones)", ge=1)


@dataclass
class PreferenceEval:
    """``eval=preference``: docs/methods.md §10, implicit-reward accuracy and margins."""

    protocol: Literal["preference"] = key("the runner")
    dataset: str = key("a key of sets, or the path of a JSONL file of pairs")
    sets: dict[str, str | None] = key("set name -> JSONL file of pairs")
    limit: int | None = key("the first N pairs (null = all)", ge=1)
    batch_size: int = key("pairs per forward batch", ge=1)
    beta: float = key("β of the implicit reward", gt=0)
    max_length: int = key("prompt + response tokens at most", ge=2)
    max_prompt_length: int = key("prompt tokens kept (the last ones)", ge=1)
    win_rate: WinRate = key("generation settings of the win rate")

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        return check_sets(node, path, "dataset") + Dataset.cross_check(node, path)


EVAL = OneOf("protocol", {"instruct": InstructEval, "nll": NLLEval, "preference": PreferenceEval})


@dataclass
class FinalInstruct(InstructEval):
    enabled: bool = key("evaluate the best checkpoint after training")


@dataclass
class FinalNLL(NLLEval):
    enabled: bool = key("evaluate the best checkpoint after training")


@dataclass
class FinalPreference(PreferenceEval):
    enabled: bool = key("evaluate the best checkpoint after training")


FINAL_EVAL = OneOf("protocol", {"instruct": FinalInstruct, "nll": FinalNLL, "preference": FinalPreference})
