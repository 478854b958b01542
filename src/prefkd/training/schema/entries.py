"""The schema of each entry point's whole config (config/<entry>.yaml with its groups): its top-level keys, the
group each holds (:mod:`prefkd.training.schema.groups`) and the key combinations the entry point cannot run.
"""

from dataclasses import dataclass
from typing import Literal

from prefkd.training.schema.groups import (
    DEVICE,
    DTYPE,
    EVAL,
    FINAL_EVAL,
    LOGGER,
    MODEL,
    OPTIONAL_MODEL,
    TEACHER,
    Dataset,
    SamplingKeys,
    Trainer,
)
from prefkd.utils.config_schema import Target, check_params, join, key, locate

HYDRA = "Hydra's own settings (run and sweep folders; not checked here)"
WEIGHT_TRANSFORMS = ("origin", "binary", "threshold", "threshold_and_scale", "random", "rank_based")


# ------------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """``python -m prefkd.train`` (config/train.yaml)."""

    teacher: TEACHER = key("the teacher model (config/teacher/); empty with teacher=none")
    student: MODEL = key("the student model (config/student/)")
    loss: Target() = key("the training objective (config/loss/)")
    dataset: Dataset = key("the training data (config/dataset/)")
    trainer: Trainer = key("optimisation, evaluation, checkpoints (config/trainer/)")
    logger: LOGGER = key("experiment tracking (config/logger/)")
    final_eval: FINAL_EVAL = key("the evaluation after training (config/eval/ keys and enabled)", optional=True)
    run_name: str = key("a readable name for logs and wandb")
    method: str | None = key("the method's label in reports (null = the loss config's name)")
    hydra: dict = key(HYDRA, optional=True)


def teacher_given(node, why: str) -> list[str]:
    if not node["teacher"]:
        return [f"teacher: empty (teacher=none), but {why}: pick a teacher (e.g. teacher=smollm2 or a model= preset)"]
    return []


@dataclass
class Cache:
    """``cache`` of ``python -m prefkd.teacher_cache``."""

    dir: str = key("where the cache goes")
    store: Literal["topk", "hidden"] = key("the top-k log-probs, or the last hidden states")
    top_k: int = key("store=topk: log-probs kept per teacher position", ge=1)
    batch_size: int = key("examples per teacher forward", ge=1)
    shard_size: int = key("examples per shard file", ge=1)
    device: str = key("where the teacher runs", **DEVICE)
    progress: bool = key("progress bar")


@dataclass
class TeacherCacheConfig(TrainConfig):
    """``python -m prefkd.teacher_cache`` (config/teacher_cache.yaml): the training config and ``cache``."""

    cache: Cache = key("the cache to build")

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        return teacher_given(node, "a teacher cache holds a teacher's outputs")


@dataclass
class TermGradientsConfig(TrainConfig):
    """``python -m prefkd.term_gradients`` (config/term_gradients.yaml): the training config and the loss's terms."""

    terms: dict[str, dict | None] = key("name -> loss overrides that isolate one term (the first: the reference)")
    differences: dict[str, list[str]] = key("name -> [a, b]: the gradient of term a minus that of term b")
    checkpoint: str | None = key("a training checkpoint folder (its student weights and projectors)")
    examples: int = key("dev records in the batch", ge=1)
    step: int = key("the optimizer step the loss sees", ge=0)
    seed: int = key("projector initialisation and dropout masks, the same for every term")

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        problems = teacher_given(node, "the terms are distillation terms, scored against a teacher")
        if not node["terms"]:
            problems.append("terms: empty; give at least one, e.g. terms={ce: {kd_rate: 0}}")
        try:
            loss = locate(node["loss"]["_target_"])
        except Exception:  # reported for loss._target_
            return problems
        for name, overrides in node["terms"].items():
            problems += check_params(overrides or {}, loss, join("terms", name), owner=node["loss"]["_target_"])
        for name, pair in node["differences"].items():
            problems += [f"differences.{name}: {part!r} is not a term (terms: {', '.join(node['terms'])})"
                         for part in pair if part not in node["terms"]]
            if len(pair) != 2:
                problems.append(f"differences.{name}={list(pair)}: expects two terms [a, b]")
        return problems


# ------------------------------------------------------------------------------------------------ evaluation
def model_given(node, path: str) -> list[str]:
    if node["path"] is None and node.get("adapter") is None:
        return [f"{path}.path: null (and no {path}.adapter): pass {path}.path=CHECKPOINT (a checkpoint folder, hub id "
                f"or .gguf file), or {path}.adapter=LORA_DIR"]
    return []


@dataclass
class EvaluateConfig:
    """``python -m prefkd.evaluate`` (config/evaluate.yaml), and a training run's ``final_eval``."""

    eval: EVAL = key("the protocol (config/eval/)")
    logger: LOGGER = key("where the results go besides output_dir (config/logger/)", optional=True)
    model: MODEL = key("the evaluated model")
    reference: OPTIONAL_MODEL = key("preference: the reference policy (path null = none)")
    reward_model: OPTIONAL_MODEL = key("preference: a reward model for the win rate (path null = none)")
    device: str = key("where the models run", **DEVICE)
    num_threads: int | None = key("torch CPU threads (0 or null = torch's default)", ge=0)
    progress: bool = key("progress bars")
    output_dir: str = key("results and generations; reuse it to resume", optional=True)
    hydra: dict = key(HYDRA, optional=True)

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        return model_given(node["model"], "model")


@dataclass
class GenerateConfig:
    """``python -m prefkd.generate`` (config/generate.yaml)."""

    dataset: Dataset = key("the prompts (config/dataset/)")
    model: MODEL = key("the generating model")
    out: str | None = key("the JSONL to write (required)")
    split: Literal["train", "dev", "test"] = key("whose prompts")
    limit: int | None = key("only the first N records of the split (null = all)", ge=1)
    num_samples: int = key("answers sampled per prompt", ge=1)
    batch_size: int = key("prompts per model.generate call", ge=1)
    seed: int = key("sampling seed")
    sampling: SamplingKeys = key("decoding settings")
    device: str = key("where the model runs", **DEVICE)
    precision: DTYPE = key("the model's dtype")
    num_threads: int | None = key("torch CPU threads (0 or null = torch's default)", ge=0)
    progress: bool = key("progress bar")
    hydra: dict = key(HYDRA, optional=True)


# ------------------------------------------------------------------------------------------------ preference pairs
def pairs_dataset(node, entry: str) -> list[str]:
    """``entry`` reads preference pairs: ``dataset=hh`` (or a dataset of that kind), not as SFT records."""
    if node["dataset"].get("kind") != "preference" or node["dataset"]["source"].get("as_sft"):
        return [f"dataset: {entry} reads preference pairs (chosen/rejected), and this dataset gives "
                f"instruction records: use dataset=hh with dataset.source.train=PAIRS.jsonl"]
    return []


@dataclass
class ReferenceLogpsConfig:
    """``python -m prefkd.reference_logps`` (config/reference_logps.yaml)."""

    dataset: Dataset = key("the pairs and their tokenisation (config/dataset/, preference kind)")
    model: MODEL = key("the reference policy")
    output: str | None = key("the JSONL written (null = <run dir>/reference_logps.jsonl)")
    batch_size: int = key("pairs per forward batch", ge=1)
    device: str = key("where the model runs", **DEVICE)
    progress: bool = key("progress bar")
    hydra: dict = key(HYDRA, optional=True)

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        return pairs_dataset(node, "prefkd.reference_logps")


@dataclass
class PolicyTokenizer:
    """``policy`` of ``python -m prefkd.weights``: whose tokenizer defines the parents."""

    path: str | None = key("the student (null = the contrastive models' tokenizer)")
    tokenizer_path: str | None = key("a tokenizer folder or hub id, if different from path")


@dataclass
class WeightSettings:
    """``weights``: w_p = k·exp(μ·clamp(ℓ⁺ − ℓ⁻, lower, upper)), then a per-response transform."""

    k: float = key("scale k", gt=0)
    lower: float = key("L, lower clamp of ℓ⁺ − ℓ⁻")
    upper: float = key("U, upper clamp of ℓ⁺ − ℓ⁻")
    per_token: bool = key("one weight per token (loss=tisdpo) instead of per parent (loss=kd_tisdpo)")
    transform: Literal[WEIGHT_TRANSFORMS] = key("the per-response transform")
    seed: int = key("seed of the random transform")
    params: dict[str, dict[str, float]] = key("each transform's parameters")

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        problems = [f"{path}.params.{name}: unknown transform (transforms: {', '.join(WEIGHT_TRANSFORMS)})"
                    for name in node["params"] if name not in WEIGHT_TRANSFORMS]
        if node["lower"] > node["upper"]:
            problems.append(f"{path}.lower={node['lower']} is above {path}.upper={node['upper']}: the clamp "
                            f"[lower, upper] is empty; keep lower ≤ upper")
        return problems


@dataclass
class WeightsConfig:
    """``python -m prefkd.weights`` (config/weights.yaml)."""

    dataset: Dataset = key("the pairs to weight (config/dataset/, preference kind)")
    positive: MODEL = key("π⁺: the DPO-trained teacher")
    negative: MODEL = key("π⁻: the teacher DPO-trained on the reversed pairs")
    policy: PolicyTokenizer = key("the student whose tokenizer defines the parents")
    weights: WeightSettings = key("the weight formula and transform")
    output: str | None = key("the weighted JSONL (null = <run dir>/weights.jsonl)")
    batch_size: int = key("pairs per forward batch", ge=1)
    device: str = key("where the models run", **DEVICE)
    num_threads: int | None = key("torch CPU threads (0 or null = torch's default)", ge=0)
    progress: bool = key("progress bar")
    hydra: dict = key(HYDRA, optional=True)

    @staticmethod
    def cross_check(node, path: str) -> list[str]:
        return pairs_dataset(node, "prefkd.weights")


ENTRIES = {"train": TrainConfig, "teacher_cache": TeacherCacheConfig, "term_gradients": TermGradientsConfig,
           "evaluate": EvaluateConfig, "generate": GenerateConfig, "reference_logps": ReferenceLogpsConfig,
           "weights": WeightsConfig}
