"""Naive references written from the SPEC's formulas (DTW, the divergences, DSKD-CMA), float64 per-row leaves for
them, and the comparison of a loss's gradients with a reference's."""

from __future__ import annotations

import math

import numpy as np
import torch

from prefkd.losses.base import LossInputs
from prefkd.losses.dskd import DSKDCMALoss
from tests.helpers.pairs import leaf


# ---------------------------------------------------------------------------------------------- edit distance
def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit costs, on code points), the textbook recurrence."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# ---------------------------------------------------------------------------------------------- DTW
def naive_dtw(cost: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """docs/methods.md §6 written out: D[i,j] = C[i,j] + min(D[i−1,j], D[i,j−1], D[i−1,j−1]) with D[−1,−1] = 0 and ∞ on
    the other borders; backtrack with np.argmin([diag, up, left]) (first minimum wins)."""
    n, m = cost.shape
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0
    for i in range(n):
        for j in range(m):
            d[i + 1, j + 1] = cost[i, j] + min(d[i, j + 1], d[i + 1, j], d[i, j])
    d = d[1:, 1:]
    i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
    while i > 0 or j > 0:
        options = [d[i - 1, j - 1] if i and j else np.inf, d[i - 1, j] if i else np.inf, d[i, j - 1] if j else np.inf]
        move = int(np.argmin(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i, j))
    return d, path[::-1]


# ---------------------------------------------------------------------------------------------- DSKD-CMA
def ref_divergence(name: str, zs: torch.Tensor, zt: torch.Tensor, tau: float, tau_t: float = 1.0) -> torch.Tensor:
    """docs/methods.md §3 per row, float64, explicit softmaxes: p_S = softmax(z^s/τ), p_T = softmax(z^t/(τ·τ_t))."""
    ls, lt = torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / (tau * tau_t), -1)
    ps, pt = ls.exp(), lt.exp()
    if name == "forward_kl":
        return (pt * (lt - ls)).sum(-1)
    if name == "reverse_kl":
        return (ps * (ls - lt)).sum(-1)
    if name == "js":
        lm = torch.log((ps + pt) / 2)
        return 0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    raise KeyError(name)


def ce_rows(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)


def f64_params(loss) -> dict[str, torch.Tensor]:
    return {n: leaf(p.double()) for n, p in loss.projectors.named_parameters()}


def reference_cma(inputs: LossInputs, loss: DSKDCMALoss, divergence: str, tau: float, tau_t: float,
                  kd_rate: float, pretrain: bool = False, warm: bool = False, teacher_space: bool = True):
    """docs/methods.md §4 DSKD-CMA, one sequence at a time on its unpadded length, float64, with the masked entries of A
    dropped (not filled). std = torch's whole-tensor std of the sequence's tensor. Returns (values, grads).
    ``warm``: the projector warm-up's loss, (1 − kd_rate)·CE + kd_rate·(L_ce^{t→s} + L_kd^{tea}) with h^s detached
    in L_kd^{tea} (the student learns from CE alone). ``teacher_space=False``: KD without L_kd^{tea}."""
    b, s, t = inputs.batch, inputs.student, inputs.teacher
    P = f64_params(loss)
    zs_all, hs_all = leaf(s.logits.double()), leaf(s.hidden.double())
    E_s, E_t = s.model.get_input_embeddings().weight.double(), t.model.get_input_embeddings().weight.double()
    W_s, W_t = s.model.get_output_embeddings().weight.double(), t.model.get_output_embeddings().weight.double()
    d_t = t.hidden.shape[-1]
    names = ("ce", "ce_t2s", "kd_stu", "kd_tea", "t2s_acc")
    terms = dict.fromkeys(names, 0.0)
    for i in range(b["labels"].shape[0]):
        n, m = int(b["attention_mask"][i].sum()), int(b["teacher_attention_mask"][i].sum())
        y_s, y_t = b["labels"][i, :n], b["teacher_labels"][i, :m]
        ms, mt = y_s != -100, y_t != -100
        x, y = torch.where(ms, b["input_ids"][i, :n], 0), torch.where(ms, y_s, 0)
        xt, yt = torch.where(mt, b["teacher_input_ids"][i, :m], 0), torch.where(mt, y_t, 0)
        Q = torch.cat([E_s[x], E_s[y]], -1) @ P["query.weight"].T + P["query.bias"]
        K = torch.cat([E_t[xt], E_t[yt]], -1)
        K = K / K.std()
        h_t = t.hidden[i, :m].double()
        V_t = (h_t / h_t.std() + E_t[yt] / E_t[yt].std()) @ P["t2s.weight"].T + P["t2s.bias"]
        V_s = (hs_all[i, :n].detach() if warm else hs_all[i, :n]) @ P["s2t.weight"].T + P["s2t.bias"]
        A = (Q @ K.T / math.sqrt(2 * d_t))[ms][:, mt]  # only the valid block
        z_t2s = (torch.softmax(A, -1) @ V_t[mt]) @ W_s.T
        target = y[ms]
        acc = (z_t2s.argmax(-1) == target).double()
        zs = zs_all[i, :n][ms]
        terms["ce"] = terms["ce"] + ce_rows(zs, target).sum()
        terms["ce_t2s"] = terms["ce_t2s"] + ce_rows(z_t2s, target).sum()
        terms["t2s_acc"] = terms["t2s_acc"] + acc.sum()
        terms["kd_stu"] = terms["kd_stu"] + (acc * ref_divergence(divergence, zs, z_t2s.detach(), tau, tau_t)).sum()
        z_s2t = (torch.softmax(A.T, -1) @ V_s[ms]) @ W_t.T
        z_t = t.logits[i, :m][mt].double()
        terms["kd_tea"] = terms["kd_tea"] + ref_divergence("forward_kl", z_s2t, z_t, tau).sum()
    if not teacher_space:
        terms["kd_tea"] = torch.zeros(())
    kd = terms["ce_t2s"] + terms["kd_stu"] + terms["kd_tea"]
    total = terms["ce_t2s"] if pretrain else (1 - kd_rate) * terms["ce"] + kd_rate * kd
    if warm:
        total = (1 - kd_rate) * terms["ce"] + kd_rate * (terms["ce_t2s"] + terms["kd_tea"])
    wrt = {"student_logits": zs_all, "student_hidden": hs_all, **P}
    grads = dict(zip(wrt, torch.autograd.grad(total, list(wrt.values()), allow_unused=True)))
    values = {k: torch.as_tensor(v).detach() for k, v in terms.items()} | {"kd": kd.detach(), "loss": total.detach()}
    return values, grads


# ---------------------------------------------------------------------------------------------- leaves and gradients
class RowLeaves:
    """float64 copies of the student logits as one autograd leaf per (b, j) row (``x[b, j]``), so that the
    reference's gradient costs per row, not a B×T×V tensor per indexing op; ``grad(total)`` assembles B×T×V."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.rows = logits.detach(), {}
        self.shape = logits.shape

    def __getitem__(self, key):
        if key not in self.rows:
            self.rows[key] = self.logits[key].double().requires_grad_(True)
        return self.rows[key]

    def grad(self, total: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.float64)
        grads = torch.autograd.grad(total, list(self.rows.values()), allow_unused=True)
        for key, g in zip(self.rows, grads):
            if g is not None:
                out[key] = g
        return out


def module_grads(inputs: LossInputs, loss) -> dict[str, torch.Tensor | None]:
    return {"student_logits": inputs.student.logits.grad, "student_hidden": inputs.student.hidden.grad,
            **{n: p.grad for n, p in loss.projectors.named_parameters()}}


def assert_grads_close(got: dict, want: dict, rtol=1e-4, atol=1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        w = want[name] if want[name] is not None else torch.zeros(())
        g = got[name] if got[name] is not None else torch.zeros_like(w)
        assert w.abs().max() > 0, f"the reference gradient of {name} is zero: the test checks nothing"
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * float(w.abs().max()), msg=name)
