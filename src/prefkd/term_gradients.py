"""`python -m prefkd.term_gradients [train overrides ...] [checkpoint=DIR] [examples=16]`: which way each term of a
loss pulls the student.

A loss's terms are isolated by re-instantiating its config with some weights zeroed (``terms``: name -> loss
overrides; e.g. ``ce: {kd_rate: 0}`` and ``kd: {kd_rate: 1}`` for DSKD-CMA, whose loss is (1 − kd_rate)·CE +
kd_rate·KD); ``differences`` name the gradient of one variant minus another (``kd_tea: [kd, kd_stu]``). For each,
on the first ``examples`` records of the dev split (one batch, the student in train mode so dropout is as in
training, the loss at step ``step``), it prints the value per response token, the norm of g = ∇_θ loss over the
student's trainable parameters θ, and cos(g, g_ce) with the first term's gradient:

    cos(g_a, g_b) = g_a·g_b / (‖g_a‖ ‖g_b‖)

With ``checkpoint`` the student's weights and the loss's own modules (projectors) come from a training checkpoint
(``<run>/checkpoints/best``). Every variant starts from the same projector initialisation (seed ``seed``).
docs/results.md uses it to show why the dual-space KD terms hurt a freshly pruned student.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefkd.training.datasets import build_datasets
from prefkd.training.schema import check_entry, reported
from prefkd.training.teacher_placement import split_teacher_config
from prefkd.utils.config import config_dir, load_env
from prefkd.utils.devices import set_num_threads
from prefkd.utils.labels import IGNORE_INDEX


def load_checkpoint(checkpoint: str, student, losses: dict) -> None:
    """The student's weights and every loss variant's own modules from a ``save_checkpoint`` directory."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    student.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=student.model.dtype)
    modules = Path(checkpoint) / "projectors.safetensors"
    if modules.is_file():
        state = load_file(str(modules))
        for name, loss in losses.items():
            loss.load_state_dict(shared_modules(state, loss, name), strict=False)


def shared_modules(state: dict, loss, name: str) -> dict:
    """The entries of a checkpoint's loss state that ``loss`` has too, by key. DSKD-CMA's projectors are
    ``projectors.*`` in ``dskd_cma`` and ``dual_space.projectors.*`` in MCW-KD: either loads into the other."""
    own = loss.state_dict().keys()
    fitted = {}
    for key, value in state.items():
        for candidate in (key, key.removeprefix("dual_space."), f"dual_space.{key}"):
            if candidate in own:
                fitted[candidate] = value
                break
    if state and own and not fitted:
        raise ValueError(f"terms.{name}: none of the checkpoint's loss modules ({sorted(state)[:4]} ...) belongs to "
                         f"this loss ({sorted(own)[:4]} ...): is it the checkpoint of another method?")
    return fitted


def term_gradients(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """name -> {value, norm, cos} for every term and difference of ``cfg.terms`` / ``cfg.differences``."""
    from prefkd.losses.base import LossInputs, ModelOutputs

    check_entry(cfg, "term_gradients")  # every key (the terms' loss keys too), before any data or model loads
    splits = instantiate(cfg.dataset.source)
    torch.manual_seed(cfg.seed)
    student, teacher = instantiate(cfg.student), instantiate(split_teacher_config(cfg.teacher)[0])
    losses = {}
    for name, overrides in cfg.terms.items():
        torch.manual_seed(cfg.seed)  # the same projector initialisation for every variant
        loss = instantiate(cfg.loss, **(OmegaConf.to_container(overrides, resolve=True) if overrides else {}))
        loss.setup(student.tokenizer, teacher.tokenizer)
        loss.build(student.model, teacher.model)
        losses[name] = loss
    if cfg.checkpoint:
        load_checkpoint(cfg.checkpoint, student, losses)
    # the configured loss's precompute hooks (MCW-KD's lexical cost), whatever the terms
    data_loss = instantiate(cfg.loss)
    data_loss.setup(student.tokenizer, teacher.tokenizer)
    _, dev = build_datasets(cfg, splits, student, teacher, data_loss)
    if dev is None:
        raise ValueError("the dataset has no dev split: set dataset.source.dev_size (or a dev file)")
    batch = dev.collate([dev[i] for i in range(min(cfg.examples, len(dev)))], student.tokenizer.pad_token_id,
                    teacher.tokenizer.pad_token_id)
    model = student.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        t = teacher.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                          output_hidden_states=True)
    tokens = batch["labels"].ne(IGNORE_INDEX).sum()
    grads, values = {}, {}
    for name, loss in losses.items():
        torch.manual_seed(cfg.seed)  # the same dropout masks for every variant
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        inputs = LossInputs(batch=batch, student=ModelOutputs(out.logits, out.hidden_states[-1], model),
                            teacher=ModelOutputs(t.logits, t.hidden_states[-1], teacher.model), step=cfg.step)
        value = loss(inputs).loss / tokens
        g = torch.autograd.grad(value, params, allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]
                                ).double()
        values[name] = float(value)
    for name, (a, b) in (cfg.get("differences") or {}).items():
        grads[name], values[name] = grads[a] - grads[b], values[a] - values[b]
    first = grads[next(iter(cfg.terms))]
    return {name: {"value": values[name], "norm": float(g.norm()),
                   "cos": float(g @ first / (g.norm() * first.norm()).clamp_min(1e-30))} for name, g in grads.items()}


@hydra.main(config_path=config_dir(), config_name="term_gradients", version_base="1.3")
def main(cfg: DictConfig) -> None:
    load_env()
    with reported():
        set_num_threads(cfg.trainer.num_threads)
        rows = term_gradients(cfg)
    first = next(iter(cfg.terms))
    print(f"\n| term | value per token | ‖∇ student‖ | cos with ∇{first} |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['value']:.3f} | {r['norm']:.4f} | {r['cos']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
