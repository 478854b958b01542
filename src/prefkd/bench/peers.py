"""``python -m prefkd.bench --peers``: prefkd's losses against other implementations of the same quantity, on the
same inputs in the same process.

Every comparison starts at the hidden states (the student's a leaf, the teacher's detached) and ends at the gradients
w.r.t. the student's hidden states, its head weight and the loss's own parameters; both sides compute the same
scalar (a sum over the batch's response tokens). Reported per peer: the value of each side and their relative
difference, the largest gradient difference relative to the peer's largest gradient entry (``agree``: ≤ 1e-4 and
≤ 1e-3), the median time of forward + backward of each and ``time_ratio`` = ours / peer, the peak bytes of live
tensors in the region (head weight's V×H gradient excluded) in B×T×V_s fp32 units and ``mem_ratio`` = ours / peer.
"Ours" is the loss as training runs it: with fused output heads when the loss takes them (``fused_head``), else on
logits built from the hidden states.

Peers:

- ``trl_gkd``: TRL's ``GKDTrainer.generalized_jsd_loss`` (full logits, ``reduction="sum"``) against ``loss=kd`` with
  ``divergence=gjsd`` and ``kd_rate=1`` (the same β and τ), on a same-vocabulary pair.
- ``trl_chunked``: TRL's DistillationTrainer chunked divergence path
  (``trl.trainer.distillation_trainer._chunked_divergence_loss``: hidden states and heads projected on tiles,
  ``num_items_in_batch=1`` for the sum) against the same kd. On a device without Triton it projects every position,
  prompt and padding included (TRL's own choice there).
- ``uld``, ``minedit``, ``multilevel_ot``, ``dskd_cma``, ``mcw_kd``: the eager full-logits references of
  :mod:`prefkd.bench.references` against the loss, on the cross-tokenizer pair.

The TRL rows need ``trl`` (``pip install 'prefkd[peers]'``); without it they are skipped with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefkd.bench.measure import LiveBytes, median_ms
from prefkd.bench.references import REFERENCES, reference_for
from prefkd.losses.base import LossInputs
from prefkd.models.heads import forward_hidden, output_head
from prefkd.training.fused_head import outputs_from_hidden
from prefkd.utils.labels import IGNORE_INDEX

TRL_PEERS = ("trl_gkd", "trl_chunked")
PEERS = (*TRL_PEERS, *REFERENCES)
VALUE_RTOL, GRAD_RTOL = 1e-4, 1e-3


def trl_functions() -> dict[str, Callable | str]:
    """{peer: TRL's function, or why it is not usable here (trl missing, or a TRL without that function)}."""
    found: dict[str, Callable | str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns on every import of trl.experimental
        try:
            try:
                from trl.experimental.gkd import GKDTrainer
            except ImportError:  # TRL before GKD moved to trl.experimental
                from trl import GKDTrainer
            found["trl_gkd"] = GKDTrainer.generalized_jsd_loss
        except ImportError as err:
            found["trl_gkd"] = f"TRL's GKDTrainer is not importable ({err}); pip install 'prefkd[peers]'"
        try:
            from trl.trainer.distillation_trainer import _chunked_divergence_loss
            found["trl_chunked"] = _chunked_divergence_loss
        except ImportError as err:
            found["trl_chunked"] = (f"TRL's DistillationTrainer chunked path is not importable ({err}); "
                                    "pip install 'prefkd[peers]'")
    return found


@dataclass
class Measured:
    value: float
    grads: list[torch.Tensor | None]
    ms: float
    peak_btv: float


@dataclass
class Region:
    """The inputs of a comparison: the batch, the student's hidden states (a leaf) and head weight, the teacher's
    hidden states (detached), both models, and what the gradients are taken w.r.t."""

    batch: dict
    hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    student: torch.nn.Module
    teacher: torch.nn.Module
    wrt: list[torch.Tensor]

    @property
    def btv(self) -> int:
        """Bytes of one B×T×V_s fp32 tensor."""
        return self.hidden.shape[0] * self.hidden.shape[1] * output_head(self.student).weight.shape[0] * 4


def region(batch: dict, student: torch.nn.Module, teacher: torch.nn.Module, loss) -> Region:
    with torch.no_grad():
        s_hidden = forward_hidden(student, batch["input_ids"], batch["attention_mask"])
        t_hidden = forward_hidden(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    h = s_hidden.detach().requires_grad_(True)
    params = [p for m in loss.trainable_modules() for p in m.parameters() if p.requires_grad]
    return Region(batch, h, t_hidden.detach(), student, teacher, [h, output_head(student).weight, *params])


def measure(fn: Callable[[], torch.Tensor], r: Region, warmup: int, repeats: int, device: torch.device) -> Measured:
    """Value, gradients, median time and peak (:class:`LiveBytes`) of ``fn``'s forward + backward."""
    def run():
        out = fn()
        return out.detach(), torch.autograd.grad(out, r.wrt, allow_unused=True)

    value, grads = run()
    tracker = LiveBytes(skip=(tuple(r.wrt[1].shape),))
    with tracker:
        run()
    ms = median_ms(run, warmup, repeats, device)
    return Measured(float(value), list(grads), ms, tracker.peak / r.btv)


def ours(loss, r: Region) -> Callable[[], torch.Tensor]:
    """The loss as training runs it from the hidden states (fused heads when the loss takes them)."""
    fused = loss.fused_head

    def fn() -> torch.Tensor:
        s = outputs_from_hidden(r.student, r.hidden, fused=fused)
        with torch.no_grad():
            t = outputs_from_hidden(r.teacher, r.teacher_hidden, fused=fused)
        return loss(LossInputs(batch=r.batch, student=s, teacher=t)).loss

    return fn


def eager(reference, loss, r: Region) -> Callable[[], torch.Tensor]:
    """An eager reference on the logits head(h) of both sides (the teacher's under no_grad)."""
    def fn() -> torch.Tensor:
        s = outputs_from_hidden(r.student, r.hidden, fused=False)
        with torch.no_grad():
            t = outputs_from_hidden(r.teacher, r.teacher_hidden, fused=False)
        return reference(loss, r.batch, s, t)

    return fn


def trl_gkd(fn, loss, r: Region) -> Callable[[], torch.Tensor]:
    beta, tau = loss._divergence.keywords["beta"], loss._divergence.keywords["temperature"]
    s_head, t_head = output_head(r.student), output_head(r.teacher)

    def run() -> torch.Tensor:
        s = s_head.project(r.hidden)
        with torch.no_grad():
            t = t_head.project(r.teacher_hidden)
        return fn(s, t, labels=r.batch["labels"], beta=beta, temperature=tau, reduction="sum")

    return run


def trl_chunked(fn, loss, r: Region) -> Callable[[], torch.Tensor]:
    beta, tau = loss._divergence.keywords["beta"], loss._divergence.keywords["temperature"]
    s_head, t_head = output_head(r.student), output_head(r.teacher).detach()
    mask = r.batch["labels"].ne(IGNORE_INDEX).long()

    def run() -> torch.Tensor:
        return fn(r.hidden, r.teacher_hidden, s_head.weight, t_head.weight, mask, beta, num_items_in_batch=1,
                  student_lm_head_bias=s_head.bias, teacher_lm_head_bias=t_head.bias, temperature=tau)[0]

    return run


def compare(a: Measured, b: Measured) -> dict:
    """The report of ``a`` (ours) against ``b`` (the peer)."""
    rel = abs(a.value - b.value) / max(abs(b.value), 1e-12)
    grad_rel = 0.0
    for ga, gb in zip(a.grads, b.grads):
        if ga is None and gb is None:
            continue
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        grad_rel = max(grad_rel, float((ga.double() - gb.double()).abs().max() / gb.double().abs().max().clamp_min(
            1e-30)))
    return {"value_ours": a.value, "value_peer": b.value, "value_rel_diff": float(f"{rel:.3g}"),
            "grad_rel_diff": float(f"{grad_rel:.3g}"), "agree": rel <= VALUE_RTOL and grad_rel <= GRAD_RTOL,
            "ms_ours": round(a.ms, 2), "ms_peer": round(b.ms, 2), "time_ratio": round(a.ms / b.ms, 3),
            "peak_btv_ours": round(a.peak_btv, 3), "peak_btv_peer": round(b.peak_btv, 3),
            "mem_ratio": round(a.peak_btv / max(b.peak_btv, 1e-12), 3)}


def run_trl_peers(names, prepare, warmup: int, repeats: int, device: torch.device) -> dict:
    """The TRL rows among ``names``. ``prepare(loss_name, extra_overrides)`` -> (loss, batch, student model, teacher
    model) on the same-vocabulary pair."""
    wanted = [n for n in names if n in TRL_PEERS]
    if not wanted:
        return {}
    functions = trl_functions()
    out = {n: {"skipped": functions[n]} for n in wanted if isinstance(functions[n], str)}
    usable = [n for n in wanted if n not in out]
    if not usable:
        return out
    loss, batch, student, teacher = prepare("kd", ["loss.divergence=gjsd", "loss.kd_rate=1.0"])
    r = region(batch, student, teacher, loss)
    mine = measure(ours(loss, r), r, warmup, repeats, device)
    build = {"trl_gkd": trl_gkd, "trl_chunked": trl_chunked}
    for n in usable:
        peer = measure(build[n](functions[n], loss, r), r, warmup, repeats, device)
        out[n] = {"ours": f"kd (gjsd, kd_rate 1, {'fused' if loss.fused_head else 'logits built'})",
                  **compare(mine, peer)}
    return {n: out[n] for n in wanted}


def run_reference_peers(names, prepare, warmup: int, repeats: int, device: torch.device) -> dict:
    """The eager-reference rows among ``names``, on the cross-tokenizer pair (``prepare`` as in
    :func:`run_trl_peers`)."""
    out = {}
    for name in (n for n in names if n in REFERENCES):
        loss, batch, student, teacher = prepare(name, [])
        reference, why = reference_for(name, loss)
        if reference is None:
            out[name] = {"skipped": why}
            continue
        r = region(batch, student, teacher, loss)
        mine = measure(ours(loss, r), r, warmup, repeats, device)
        out[name] = {"ours": f"{name} ({'fused' if loss.fused_head else 'logits built'})",
                     **compare(mine, measure(eager(reference, loss, r), r, warmup, repeats, device))}
    return out
