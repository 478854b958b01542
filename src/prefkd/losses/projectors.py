"""DSKD's projectors and the cross-model attention of DSKD-CMA (docs/methods.md §4).

Projectors are ``nn.Linear`` with bias, fp32, created by :func:`make_projectors` from the two models' sizes:

    t2s: d_t → d_s,   s2t: d_s → d_t,   query: 2e_s → 2e_t (CMA only)

(d = the size of the last hidden state = the output head's input, e = the input-embedding size; e = d for
every supported model, so query is docs/methods.md §4's 2d_s → 2d_t).

:func:`cross_model_attention` computes, batched over B with masks, the two projected hidden states that the
dual-space losses turn into logits with the (detached) heads:

    h̃  = softmax_rows(A)  V_t      B×n×d_s  (teacher → student space)
    h̃' = softmax_rows(Aᵀ) V_s      B×m×d_t  (student → teacher space)

Everything here runs in fp32 with autocast off (docs/methods.md §4: Q is fp32), whatever the models' dtype.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from prefkd.utils.labels import IGNORE_INDEX


def hidden_size(model: nn.Module) -> int:
    """d: the input size of the model's output head (= its last hidden state's size)."""
    return int(model.get_output_embeddings().weight.shape[1])


def embedding_size(model: nn.Module) -> int:
    """e: the width of the model's input-embedding table."""
    return int(model.get_input_embeddings().weight.shape[1])


def projector_shapes(student_model: nn.Module, teacher_model: nn.Module, query: bool) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of each projector."""
    d_s, d_t = hidden_size(student_model), hidden_size(teacher_model)
    shapes = {"t2s": (d_t, d_s), "s2t": (d_s, d_t)}
    if query:
        shapes["query"] = (2 * embedding_size(student_model), 2 * embedding_size(teacher_model))
    return shapes


def make_projectors(shapes: dict[str, tuple[int, int]], device: torch.device | str | None = None) -> nn.ModuleDict:
    """One fp32 ``nn.Linear(in, out, bias=True)`` per entry (PyTorch's default initialisation, global RNG)."""
    return nn.ModuleDict({name: nn.Linear(i, o, bias=True, device=device, dtype=torch.float32)
                          for name, (i, o) in shapes.items()})


def ensure_projectors(projectors: nn.ModuleDict, shapes: dict[str, tuple[int, int]], model: nn.Module,
                      what: str) -> None:
    """Fill an empty ``projectors`` with :func:`make_projectors` of ``shapes`` on ``model``'s device (not meta), or
    check that the ones already there have exactly these shapes (a loss's ``build`` is idempotent). ``what`` names
    them in the error, e.g. ``"loss=dskd_cma: projectors"``."""
    if len(projectors):
        have = {k: (m.in_features, m.out_features) for k, m in projectors.items()}
        if have != shapes:
            raise ValueError(f"{what} were built for {have}, the models need {shapes}")
        return
    device = model.get_output_embeddings().weight.device
    projectors.update(make_projectors(shapes, device=None if device.type == "meta" else device))


def fp32_region(device: torch.device):
    """A context with autocast off on ``device`` (projectors and attention stay fp32)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in the projector's dtype (fp32): B×T×in -> B×T×out."""
    return linear(x.to(linear.weight.dtype))


def masked_std(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per sequence, the scalar (unbiased) standard deviation of all entries of ``x[b, rows[b]]``.

    x: B×T×d; rows: B×T bool. Returns B×1×1 (clamped away from 0, so dividing by it is safe).
    Equals ``x[b, rows[b]].std()`` (torch's whole-tensor std) for each b.
    """
    w = rows.unsqueeze(-1).to(x.dtype)
    count = w.sum((1, 2)) * x.shape[-1]  # B
    mean = (x * w).sum((1, 2)) / count.clamp_min(1)
    var = ((x - mean[:, None, None]).square() * w).sum((1, 2)) / (count - 1).clamp_min(1)
    return var.sqrt().clamp_min(torch.finfo(x.dtype).tiny)[:, None, None]


@torch.no_grad()
def index_embeddings(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E(x), E(y)) in fp32, detached: ``ids`` = (input ids, target ids), each B×T; positions outside ``mask``
    use id 0 for both (as DSKD's code does). Returns two B×T×e tensors."""
    table = model.get_input_embeddings()
    x, y = (torch.where(mask, i, torch.zeros_like(i)) for i in ids)
    return table(x).float(), table(y).float()


def cross_model_attention(projectors: nn.ModuleDict, *, student_model: nn.Module, teacher_model: nn.Module,
                          batch: dict[str, torch.Tensor], student_hidden: torch.Tensor,
                          teacher_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̃ B×n×d_s, h̃' B×m×d_t) of docs/methods.md §4's DSKD-CMA, batched, fp32.

    M_s = labels ≠ −100, M_t = teacher_labels ≠ −100; x = input ids, y = labels (pre-shifted, so y_i is the
    token after x_i: DSKD's convention), id 0 outside M. E^s, E^t detached. Per sequence b:

        Q   = W_query [E^s(x); E^s(y)]                                 n×2e_t
        K   = [E^t(x_t); E^t(y_t)] / std                               m×2e_t
        V_t = W_t2s( h^t / std(h^t) + E^t(y_t) / std(E^t(y_t)) )       m×d_s
        V_s = W_s2t h^s                                                n×d_t
        A   = Q Kᵀ / √(2 d_t),  entries with M_s,i·M_t,j = 0 excluded from both softmaxes

    std(·) is the scalar std of all entries over the sequence's non-padding rows (``teacher_attention_mask``):
    per sequence, so no sequence sees another's statistics or padding (docs/methods.md §2's batch equivalence). For one
    unpadded sequence it is DSKD's ``tensor.std()`` exactly. A row of A with no valid entry (a position outside
    M) gets a uniform softmax; it is never read by the losses. Rows of V outside M are zeroed.
    """
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    m_s, m_t = labels.ne(IGNORE_INDEX), t_labels.ne(IGNORE_INDEX)
    t_rows = batch.get("teacher_attention_mask")
    t_rows = torch.ones_like(m_t) if t_rows is None else t_rows.bool()
    d_t = teacher_hidden.shape[-1]
    with fp32_region(student_hidden.device):
        es_x, es_y = index_embeddings(student_model, (batch["input_ids"], labels), m_s)
        et_x, et_y = index_embeddings(teacher_model, (batch["teacher_input_ids"], t_labels), m_t)
        keys = torch.cat([et_x, et_y], -1)
        keys = keys / masked_std(keys, t_rows)
        h_t = teacher_hidden.detach().float()
        value_in = h_t / masked_std(h_t, t_rows) + et_y / masked_std(et_y, t_rows)
        query = project(projectors["query"], torch.cat([es_x, es_y], -1)).float()
        v_t = project(projectors["t2s"], value_in).float().masked_fill(~m_t.unsqueeze(-1), 0.0)
        v_s = project(projectors["s2t"], student_hidden).float().masked_fill(~m_s.unsqueeze(-1), 0.0)
        scores = query @ keys.transpose(1, 2) / math.sqrt(2 * d_t)  # B×n×m
        pair = m_s.unsqueeze(-1) & m_t.unsqueeze(1)
        scores = scores.masked_fill(~pair, torch.finfo(scores.dtype).min)  # −inf, but a full row stays finite
        t2s = torch.softmax(scores, dim=-1) @ v_t
        s2t = torch.softmax(scores.transpose(1, 2), dim=-1) @ v_s
    return t2s, s2t
