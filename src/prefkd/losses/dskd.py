"""DSKD: dual-space knowledge distillation (docs/methods.md §4), one vocabulary (``DSKDLoss``) or any two via
cross-model attention (``DSKDCMALoss``).

Each side's hidden states are projected into the other's space and read out with the other's head (W^s, W^t,
detached): z^{t→s} = h̃ W^sᵀ, z^{s→t} = h̃' W^tᵀ, with h̃ (B×n×d_s), h̃' (B×m×d_t) from ``projected``
(DSKD: h̃ = W_t2s h^t, h̃' = W_s2t h^s at the same positions; CMA: :func:`.projectors.cross_model_attention`).
Then, as sums over tokens:

    L_ce^{t→s} = Σ_{M_s} CE(z^{t→s}, y)                          (trains t2s [and query])
    L_kd^{stu} = Σ_{M_s} a_i · D(z^s_i ‖ stopgrad z^{t→s}_i)     (a_i = 1; CMA: [argmax z^{t→s}_i = y_i])
    L_kd^{tea} = Σ_{M_t} KL(softmax(z^t/τ) ‖ softmax(z^{s→t}/τ))  (trains s2t [and query] and the student)
    KD = L_ce^{t→s} + L_kd^{stu} + L_kd^{tea};   loss = (1 − kd_rate)·Σ_{M_s} CE(z^s, y) + kd_rate·KD

D is a divergence of :mod:`prefkd.losses.divergences` with z^{t→s} in the teacher role (both sides / τ, the
teacher side also / τ_t). Teacher-side sums are plain sums too: the trainer divides everything by the student
response tokens. ``pretrain_projectors``: loss = L_ce^{t→s} only (docs/methods.md §4's projector pre-training).

Two switches that are not in docs/methods.md §4 (both off by default, so the loss is the one of docs/methods.md §4):

- ``teacher_space=False``: KD = L_ce^{t→s} + L_kd^{stu}, without L_kd^{tea} (the DSKD authors' ``only_stu_kd``).
- ``projector_warmup_steps=N``: for the first N optimizer steps of training the loss is
  w_ce·CE + kd_rate·(L_ce^{t→s} + L_kd^{tea}) with h^s detached in L_kd^{tea}: the projectors learn, the student
  learns from its CE alone. Dev losses (eval mode) are always the full loss. docs/results.md measures why: with
  untrained projectors the KD terms' gradients on the student are as large as CE's and orthogonal to it.
Metrics, sums like the loss: ce, kd, ce_t2s, kd_stu, kd_tea, t2s_acc (Σ [argmax z^{t→s}_i = y_i]).

Projectors are created by ``build(student_model, teacher_model)`` from the models' sizes; the trainer calls it
before the optimizer exists and before a checkpoint is restored (forward refuses to run without it).

Memory: z^{t→s} and z^{s→t} are never materialised for the whole batch. :func:`chunked_rows_loss` walks the
masked tokens in chunks; per chunk it multiplies the rows of h̃ (h̃') by the head, computes the terms, and
takes the gradient w.r.t. the chunk's rows of every differentiable input (z^s and h̃; h̃') into one buffer per
input. Backward scales the buffers; autograd carries them on into the projectors and h^s. Fused output heads
(issue 17): z^s and z^t are read through ``logit_source``, so with hidden states and heads the student's rows are
projected per chunk of the student-side pass (their gradient lands in a B×T×H buffer and the head's V×H one) and the
teacher's per chunk of the teacher-side pass (read detached): no B×T×V tensor exists. The teacher-side pass walks
``chunk_size``·V_s/V_t rows per chunk, so its chunks hold as many entries as the student side's, but at least d_t/16
(:func:`teacher_rows_per_chunk`); ``teacher_chunk_size`` sets the rows instead. The head products z^{t→s},
z^{s→t} are the same either way (W^s, W^t detached, weight only). Cross-model attention reads embeddings and hidden
states, never logits; its own work (about 20 tensors of B×T×d or B×n×m alive at once) does not grow with V.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, require_teacher, response_mask
from prefkd.losses.chunked import HiddenRows, RowFeatures, chunked_rows_loss, rows_per_chunk
from prefkd.losses.divergences import cross_entropy, divergence_fn, forward_kl
from prefkd.losses.projectors import cross_model_attention, ensure_projectors, fp32_region, project, projector_shapes

METRICS = ("ce", "kd", "ce_t2s", "kd_stu", "kd_tea", "t2s_acc")
STUDENT_SIDE = ("ce", "ce_t2s", "kd_stu", "t2s_acc")  # the metrics summed by the student-side pass


def head_logits(rows: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """rows n×d times a detached head V×d -> n×V logits, computed in the head's dtype, returned fp32 at least."""
    return F.linear(rows.to(head.dtype), head.detach()).to(torch.promote_types(rows.dtype, torch.float32))


def teacher_rows_per_chunk(chunk_size: int, head_shape: tuple[int, int], student_vocab: int) -> int:
    """Rows per chunk of the teacher-side pass (``teacher_chunk_size: null``): as many entries as ``chunk_size``
    student rows (:func:`~prefkd.losses.chunked.rows_per_chunk`: 10 of Qwen's 151,936 for 32 of GPT-2's 50,257), but
    never fewer than d_t/16 rows (up to ``chunk_size``): a chunk's V_t-wide work (about 7 tensors) then stays under
    half of the teacher head (V_t×d_t) that the pass reads anyway, and a few rows against a large head make thin
    matmuls that read it again and again (Qwen1.5-1.8B's 1.2 GB head: 32 rows ran the step 1.2× faster than 10,
    docs/performance.md)."""
    vocab, width = head_shape
    return max(rows_per_chunk(chunk_size, vocab, student_vocab), min(chunk_size, width // 16))


class _TeacherHeadProducts(torch.autograd.Function):
    """(z^{s→t}, z^t) of a chunk of the teacher-side pass from ONE matmul: the rows [h̃'; h^t] (2n×d_t) stacked
    against the teacher's head weight W_t, which is then read once per chunk instead of twice (fused heads: z^t is
    projected here, not by the engine). h̃' n×d_t (gradient), weight V_t×d_t (detached), t_hidden n×d_t, head the
    teacher's :class:`~prefkd.models.heads.OutputHead` -> z^{s→t} = h̃' W_tᵀ (n×V_t, fp32 at least, as
    :func:`head_logits`) and z^t = head(h^t) (n×V_t, the head's dtype, no gradient). Backward: g·W_t to h̃' only."""

    @staticmethod
    def forward(ctx, h, weight, t_hidden, head):
        n = h.shape[0]
        z = F.linear(torch.cat([h.to(weight.dtype), t_hidden.to(weight.dtype)]), weight)
        z_t = z[n:] if head.bias is None else z[n:] + head.bias
        z_t = head.finish(z_t)
        ctx.mark_non_differentiable(z_t)
        ctx.save_for_backward(weight)
        ctx.dtype = h.dtype
        return z[:n].to(torch.promote_types(h.dtype, torch.float32)), z_t

    @staticmethod
    def backward(ctx, grad_st, grad_t):
        (weight,) = ctx.saved_tensors
        return (grad_st.to(weight.dtype) @ weight).to(ctx.dtype), None, None, None


# ------------------------------------------------------------------------------------------ the losses
class _DualSpaceLoss(DistillationLoss):
    """The shared dual-space terms; subclasses give :meth:`projected` (h̃, h̃') and say whether a_i = acc_i."""

    needs = Needs(teacher=True, hidden_states=True)
    fused_head = True  # both sides' logits through logit_source: z^s and z^t projected per chunk of their passes
    name = "dskd"
    use_query = False
    accuracy_weighted = False

    def __init__(self, divergence: str = "forward_kl", kd_rate: float = 0.5, temperature: float = 1.0,
                 teacher_temperature: float = 1.0, skew_lambda: float = 0.1, adaptive_alpha: float = 0.5,
                 pretrain_projectors: bool = False, chunk_size: int = 1024, projector_warmup_steps: int = 0,
                 teacher_space: bool = True, beta: float = 0.5, teacher_chunk_size: int | None = None):
        super().__init__()
        if teacher_chunk_size is not None and teacher_chunk_size < 1:
            raise ValueError(f"teacher_chunk_size={teacher_chunk_size} must be >= 1 (or null: chunk_size·V_s/V_t)")
        self.teacher_chunk_size = teacher_chunk_size  # rows per chunk of the teacher-side pass (None: entries-matched)
        if projector_warmup_steps < 0:
            raise ValueError(f"projector_warmup_steps={projector_warmup_steps} must be >= 0 (0 = no warm-up)")
        self.divergence, self.kd_rate, self.temperature = divergence, kd_rate, temperature
        self.pretrain_projectors, self.chunk_size = bool(pretrain_projectors), chunk_size
        self.projector_warmup_steps = int(projector_warmup_steps)
        self.teacher_space = bool(teacher_space)  # false: KD = L_ce^{t→s} + L_kd^{stu} (the authors' only_stu_kd)
        # raises ValueError listing the valid names for an unknown divergence
        self._divergence = divergence_fn(divergence, temperature, teacher_temperature, skew_lambda,
                                         adaptive_alpha, beta)
        self.projectors = nn.ModuleDict()  # t2s, s2t (, query): created by build()

    def build(self, student_model: nn.Module, teacher_model: nn.Module | None) -> None:
        """Create the projectors from the models' sizes (idempotent: an existing set of the right shapes is kept).
        Must run before the optimizer is built and before a checkpoint's state_dict is loaded."""
        if teacher_model is None:
            raise ValueError(f"loss={self.name} needs a teacher model")
        ensure_projectors(self.projectors, projector_shapes(student_model, teacher_model, self.use_query),
                          student_model, f"loss={self.name}: projectors")

    def projected(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def warming_up(self, inputs: LossInputs) -> bool:
        """True while training within the first ``projector_warmup_steps`` optimizer steps: the projectors learn
        (L_ce^{t→s} and L_kd^{tea} on the detached student) and the student learns from its CE alone. Dev
        evaluation (the loss in eval mode) always computes the full loss, so dev losses stay comparable."""
        return self.training and inputs.step < self.projector_warmup_steps

    def check_inputs(self, inputs: LossInputs) -> None:
        require_teacher(inputs, self.name)
        for side in (inputs.student, inputs.teacher):
            if side.hidden is None or side.model is None:
                raise ValueError(f"loss={self.name} needs both models' last hidden states and the models "
                                 "themselves (ModelOutputs.hidden, ModelOutputs.model)")
        if not len(self.projectors):
            raise RuntimeError(f"loss={self.name}: call loss.build(student_model, teacher_model) before the first "
                               "forward (and before building the optimizer)")

    def forward(self, inputs: LossInputs) -> LossOutput:
        loss, metrics, _, _ = self.dual_space_terms(inputs)
        return LossOutput(loss=loss, metrics=metrics)

    def dual_space_terms(self, inputs: LossInputs, features: RowFeatures | None = None,
                         ce_weight: float | None = None, teacher_rows: Callable[[torch.Tensor], torch.Tensor] |
                         None = None) -> tuple[torch.Tensor, dict, torch.Tensor | None, torch.Tensor | None]:
        """(loss, metrics, student features, teacher rows' values) of the dual-space KD: ce_weight·CE + kd_rate·KD
        (ce_weight None: 1 − kd_rate, docs/methods.md §4). ``features``: :class:`RowFeatures` of the student logits,
        computed in the same chunked pass (one gradient buffer), returned third (else None). ``teacher_rows``: a
        function of the teacher's logit rows (n×V_t -> n×k, no gradient) applied in the teacher-side pass, where
        those rows are projected anyway; returned fourth, N_t×k in the order of the teacher's response positions
        (``response_mask(teacher_labels).nonzero()``), or None when that pass does not run (``teacher_space=False``)
        or has no rows."""
        self.check_inputs(inputs)
        batch, student, teacher = inputs.batch, inputs.student, inputs.teacher
        t2s_hidden, s2t_hidden = self.projected(inputs)
        head_s = student.model.get_output_embeddings().weight.detach()
        head_t = teacher.model.get_output_embeddings().weight.detach()
        rate, pretrain, weighted = self.kd_rate, self.pretrain_projectors, self.accuracy_weighted
        warm = not pretrain and self.warming_up(inputs)
        w_ce = 1 - rate if ce_weight is None else ce_weight

        def student_side(s: torch.Tensor, h: torch.Tensor, y: torch.Tensor):
            z = head_logits(h, head_s)  # z^{t→s} rows
            ce_t2s = cross_entropy(z, y)
            hit = z.detach().argmax(-1).eq(y)
            if weighted:  # D only where a_i = 1 (rows with a_i = 0 contribute exactly 0: skip their work)
                rows = hit.nonzero().squeeze(-1)
                kd_stu = torch.zeros_like(ce_t2s).index_add(0, rows, self._divergence(s[rows], z[rows]))
            else:
                kd_stu = self._divergence(s, z)  # the teacher role is detached inside
            ce = cross_entropy(s, y)
            parts = {"ce": ce, "ce_t2s": ce_t2s, "kd_stu": kd_stu, "t2s_acc": hit}
            if pretrain:
                return ce_t2s, parts
            return w_ce * ce + rate * (ce_t2s if warm else ce_t2s + kd_stu), parts

        collected: list[torch.Tensor] = []  # teacher_rows of each chunk of the teacher-side pass, in order

        source_t = teacher.logit_source
        # fused teacher whose head is W_t itself: z^t and z^{s→t} from one matmul per chunk (_TeacherHeadProducts)
        stacked = isinstance(source_t, HiddenRows) and source_t.head.weight.shape == head_t.shape and \
            source_t.head.weight.data_ptr() == head_t.data_ptr()

        def teacher_side(h: torch.Tensor, t_rows: torch.Tensor):
            if stacked:  # t_rows: the teacher's hidden rows
                z_st, z_t = _TeacherHeadProducts.apply(h, head_t, t_rows, source_t.head.detach())
            else:  # t_rows: the teacher's logit rows
                z_st, z_t = head_logits(h, head_t), t_rows
            if teacher_rows is not None:
                with torch.no_grad():
                    collected.append(teacher_rows(z_t))
            kd_tea = forward_kl(z_st, z_t, self.temperature)  # KL(p_t ‖ p_{s→t})
            return kd_tea * (0.0 if pretrain else rate), {"kd_tea": kd_tea}

        s_logits = student.logit_source.detach() if pretrain else student.logit_source
        out = chunked_rows_loss(student_side, (s_logits, t2s_hidden), response_mask(batch["labels"]), batch["labels"],
                                chunk_size=self.chunk_size, features=features, terms=STUDENT_SIDE)
        loss, values, metrics = out if features is not None else (out[0], None, out[1])
        metrics["kd_tea"] = torch.zeros_like(loss.detach())
        rows_t = None
        if self.teacher_space:
            tea_inputs = (s2t_hidden.detach() if pretrain else s2t_hidden,)  # warm-up: projected() detached h^s
            mask_t = response_mask(batch["teacher_labels"])
            chunk_t = self.teacher_chunk_size or teacher_rows_per_chunk(self.chunk_size, head_t.shape,
                                                                        student.logit_source.shape[-1])
            tea_loss, tea_metrics = chunked_rows_loss(teacher_side, tea_inputs, mask_t,
                                                      source_t.hidden if stacked else source_t, chunk_size=chunk_t,
                                                      terms=("kd_tea",))
            loss = loss + tea_loss
            metrics["kd_tea"] = tea_metrics["kd_tea"].to(loss.dtype)
            if collected:  # None when there were no rows (the caller's own pass then gives the right empty shape)
                rows_t = torch.cat(collected)
                if rows_t.shape[0] != int(mask_t.sum()):
                    raise RuntimeError(f"loss={self.name}: teacher_rows ran on {rows_t.shape[0]} rows, the teacher "
                                       f"has {int(mask_t.sum())} response positions")
        metrics["kd"] = metrics["ce_t2s"] + metrics["kd_stu"] + metrics["kd_tea"]
        return loss, {k: metrics[k].to(loss.dtype) for k in METRICS}, values, rows_t


class DSKDLoss(_DualSpaceLoss):
    """DSKD with one vocabulary (teacher and student read the same tokens): h̃ = W_t2s h^t, h̃' = W_s2t h^s.

    Projectors t2s (d_t→d_s), s2t (d_s→d_t). a_i = 1 (no accuracy mask); the teacher side of D is z^{t→s}/τ.
    ``pretrain_projectors=True``: loss = L_ce^{t→s}, which trains t2s only (see :class:`DSKDCMALoss`).
    """

    name = "dskd"

    def __init__(self, divergence: str = "forward_kl", kd_rate: float = 0.5, temperature: float = 1.0,
                 skew_lambda: float = 0.1, adaptive_alpha: float = 0.5, pretrain_projectors: bool = False,
                 chunk_size: int = 1024, projector_warmup_steps: int = 0, teacher_space: bool = True,
                 beta: float = 0.5, teacher_chunk_size: int | None = None):
        super().__init__(divergence, kd_rate, temperature, 1.0, skew_lambda, adaptive_alpha, pretrain_projectors,
                         chunk_size, projector_warmup_steps, teacher_space, beta, teacher_chunk_size)

    def projected(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        _check_same_tokens(inputs.batch, inputs.student.hidden, inputs.teacher.hidden)
        with fp32_region(inputs.student.hidden.device):
            t2s = project(self.projectors["t2s"], inputs.teacher.hidden.detach())
            student_hidden = inputs.student.hidden.detach() if self.warming_up(inputs) else inputs.student.hidden
            s2t = project(self.projectors["s2t"], student_hidden)
        return t2s, s2t


class DSKDCMALoss(_DualSpaceLoss):
    """DSKD-CMA for any two vocabularies: h̃, h̃' from cross-model attention (see
    :func:`prefkd.losses.projectors.cross_model_attention`); projectors t2s, s2t, query (2e_s→2e_t).

    a_i = acc_i = [argmax z^{t→s}_i = y_i]; D's teacher side is z^{t→s}/(τ·τ_t). Metric ``t2s_acc`` (Σ acc_i)
    becomes the projector accuracy after the trainer's per-token division.

    ``pretrain_projectors=True``: loss = L_ce^{t→s}, which depends on t2s and query only; the student's logits
    and hidden states get no gradient (the student's parameters keep ``grad=None``, which AdamW skips, so the
    student stays unchanged even with lr > 0). Under DDP freeze the student instead (no parameter of a DDP
    module may go unused), or give it lr 0.
    """

    name = "dskd_cma"
    use_query = True
    accuracy_weighted = True

    def projected(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        detach = self.pretrain_projectors or self.warming_up(inputs)
        student_hidden = inputs.student.hidden.detach() if detach else inputs.student.hidden
        return cross_model_attention(self.projectors, student_model=inputs.student.model,
                                     teacher_model=inputs.teacher.model, batch=inputs.batch,
                                     student_hidden=student_hidden, teacher_hidden=inputs.teacher.hidden)


def _check_same_tokens(batch: dict, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    """DSKD pairs position i with position i: the teacher must have read exactly the student's tokens."""
    ids = batch["input_ids"]
    teacher_ids = batch.get("teacher_input_ids", ids)
    if teacher_ids.shape != ids.shape or not torch.equal(teacher_ids.to(ids.device), ids) \
            or teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise ValueError("loss=dskd needs the same tokenizer for teacher and student (teacher_input_ids must equal "
                         f"input_ids; shapes {tuple(teacher_ids.shape)} vs {tuple(ids.shape)}). For different "
                         "tokenizers use loss=dskd_cma.")
