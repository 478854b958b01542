"""Memory-bounded token losses: Σ over masked tokens of f(rows of the inputs, other rows), in chunks.

One engine, two strategies. Sums (the distillation losses): :func:`chunked_rows_loss` precomputes the gradient in
the forward. Per-row terms that are not summed at once (the preference losses' log-probs): :func:`chunked_row_terms`
recomputes each chunk in the backward. Both walk the masked positions in the same chunks (:func:`_chunks`).

A per-token loss over B×T×V logits materialises several fp32 B×T×V tensors (softmax, log-softmax,
products) plus the autograd graph that keeps them for backward. For a 150k vocabulary that is many GB.
:func:`chunked_rows_loss` (and its one-input form :func:`chunked_token_loss`) instead walks the masked
tokens in chunks of at most ``chunk_size`` rows: per chunk it upcasts the rows to fp32, computes the values and, right
away, their gradient w.r.t. the input rows (``torch.autograd.grad`` on detached leaves), and writes that gradient into
one preallocated buffer per input, shaped like it. The per-chunk graph dies with the chunk. Backward
only scales the buffer by the incoming gradient. Alive at any time besides the logits: one chunk of
fp32 work and one gradient buffer per input (the input's dtype).

The other tensors (teacher logits, targets, ...) and the weights never receive gradients (docs/methods.md §2: the
teacher side is always stop-grad).

Fused output heads (issue 17): any logits input or other may instead be a :class:`HiddenRows`, hidden states B×T×H
with the model's :class:`~prefkd.models.heads.OutputHead`. Each chunk's logit rows are then projected from its hidden
rows (the other side's under no_grad), so no B×T×V tensor exists; the gradient w.r.t. the rows becomes one buffer
B×T×H for the hidden states and one V×H (fp32, accumulated over the chunks) for the head's weight (V for a bias).
:class:`PartnerRows` reads the other side at one partner position per student position (MinED, ULD): gathered per
chunk from logits, or from the partners' hidden states (B×n×H) projected per chunk. :class:`RowFeatures` of a
HiddenRows input are projected per chunk, and again per chunk in backward, where their gradient joins the same
buffers; when every feature row is a distinct row of the sum (Multi-Level OT's and MCW-KD's student top-k), the
features instead ride in the sum's own chunks (:class:`_ChunkedRowsShared`: each chunk projected once in forward, once
in backward). :func:`map_rows` reads the other side's rows at flat indices per chunk (Multi-Level OT's and MCW-KD's
teacher top-k); :func:`rows_per_chunk` sizes a pass over the teacher's wider rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch.autograd.function import once_differentiable

from prefkd.models.heads import OutputHead

PerTokenFn = Callable[..., torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class HiddenRows:
    """Logits given as what computes them: a model's last hidden state ``hidden`` (B×T×H) and its output ``head``
    (weight V×H). The engine projects only the rows of one chunk at a time. As a loss input, the gradient goes to
    ``hidden`` and to the head's weight and bias; as an other, it is read detached."""

    hidden: torch.Tensor
    head: OutputHead

    @property
    def shape(self) -> torch.Size:
        """B×T×V: the shape of the logits these rows stand for."""
        return torch.Size((*self.hidden.shape[:2], self.head.rows))

    @property
    def dtype(self) -> torch.dtype:
        """The logits' dtype (the head's)."""
        return self.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(hidden, weight) or (hidden, weight, bias): what may receive a gradient, in this order."""
        head = self.head
        return (self.hidden, head.weight) if head.bias is None else (self.hidden, head.weight, head.bias)

    def detach(self) -> HiddenRows:
        return HiddenRows(self.hidden.detach(), self.head.detach())

    def __getitem__(self, index) -> torch.Tensor:
        """The logits at ``index`` of the B×T positions (e.g. ``(rows, cols)``): n×V in the head's dtype."""
        return self.head.project(self.hidden[index])


Logits = torch.Tensor | HiddenRows  # B×T×V logits, or the hidden states and head that give them


class PartnerRows:
    """The other side's logit rows at each student position's partner (MinED's aligned teacher position, ULD's teacher
    position of the same response rank), for a per-token function of the chunked engine.

    source: the other side's B×m×V logits, or their :class:`HiddenRows`. index: B×n long, the flat partner row
    ``b·m + i`` of each student position (b, j), or −1 where it has none. Logits: nothing is gathered up front, and
    :meth:`rows` indexes the (B·m)×V view per chunk (no B×n×V copy). HiddenRows: :meth:`others` gathers the partners'
    hidden states once (B×n×H, small), which the engine projects per chunk, detached, like any other.
    """

    def __init__(self, source: Logits, index: torch.Tensor):
        self.source, self.index = source, index
        self.vocab = source.shape[-1]
        self._flat = None if isinstance(source, HiddenRows) else source.reshape(-1, self.vocab)  # a view

    def others(self) -> tuple[Logits, ...]:
        """What to pass the engine after the other tensors: (HiddenRows of the partners' hidden states B×n×H,
        the rows at −1 arbitrary) for HiddenRows, nothing for logits."""
        if self._flat is not None:
            return ()
        hidden = self.source.hidden.detach()
        gathered = hidden.reshape(-1, hidden.shape[-1])[self.index.clamp_min(0)]
        return (HiddenRows(gathered, self.source.head.detach()),)

    def rows(self, idx: torch.Tensor, sel: torch.Tensor, projected: Sequence[torch.Tensor]) -> torch.Tensor:
        """The partner logit rows (k×V, the source's dtype) of a chunk's selected positions. idx: the chunk's n index
        values; sel: n bool, which (partners only: idx ≥ 0); projected: the chunk's rows of :meth:`others` (n×V)."""
        if self._flat is not None:
            return self._flat[idx[sel]]
        return projected[0] if bool(sel.all()) else projected[0][sel]


def rows_per_chunk(chunk_size: int, width: int, reference: int) -> int:
    """How many rows of ``width`` entries hold as many as ``chunk_size`` rows of ``reference`` entries (at least 1,
    at most ``chunk_size``): a loss's ``chunk_size`` counts rows of the student's vocabulary, and a pass over the
    teacher's wider rows (Qwen's 151,936 against GPT-2's 50,257) walks proportionally fewer, so that its chunk work
    stays the same size."""
    return max(1, min(chunk_size, chunk_size * reference // max(width, 1)))


@torch.no_grad()
def map_rows(source: Logits, index: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
             chunk_size: int = 1024) -> torch.Tensor:
    """fn of the other side's logit rows at flat rows ``index`` (N long, ``b·T + t``), chunked, no grad: per chunk
    the n×V rows (the source's dtype; a :class:`HiddenRows` source projects them from its hidden rows) go through
    ``fn`` (n×V -> n×…, e.g. a top-k), and the results are concatenated: N×…. No B×T×V tensor is built (for logits,
    rows are indexed on a view), and only ``fn``'s outputs outlive a chunk."""
    if isinstance(source, HiddenRows):
        hidden, head = source.hidden.detach(), source.head.detach()
        hidden = hidden.reshape(-1, hidden.shape[-1])

        def rows(i: torch.Tensor) -> torch.Tensor:
            return head.project(hidden[i])
    else:
        flat = source.detach().reshape(-1, source.shape[-1])  # a view

        def rows(i: torch.Tensor) -> torch.Tensor:
            return flat[i]
    starts = range(0, max(index.numel(), 1), chunk_size)  # an empty index still gives fn's trailing shape
    return torch.cat([fn(rows(index[start:start + chunk_size])) for start in starts])


def chunked_token_loss(
    per_token_fn: PerTokenFn,
    student_logits: Logits,
    mask: torch.Tensor,
    *others: Logits,
    chunk_size: int = 1024,
    weights: torch.Tensor | None = None,
    terms: Sequence[str] = (),
):
    """Σ_{(b,t): mask[b,t]} weights[b,t] · per_token_fn(student_logits[b,t], *others[b,t]), chunked.

    student_logits: B×T×V, any float dtype, or :class:`HiddenRows` (projected per chunk); the only input that gets
        a gradient.
    mask: B×T bool, the positions that count.
    others: tensors B×T×... aligned with the student positions (teacher logits B×T×V_t or their
        :class:`HiddenRows`, targets B×T); read detached.
    weights: optional B×T per-token weights, read detached.
    per_token_fn(s [n×V, fp32 or fp64], *other_rows) -> n values; ordinary differentiable torch ops.
    chunk_size: at most this many masked tokens per chunk.
    terms: named parts to sum for metrics (per_token_fn returns (values, {name: values})), as in
        :func:`chunked_rows_loss`; the result is then (sum, {name: sum}). They are not weighted.

    Returns a scalar, the **sum** (fp32; fp64 for fp64 logits). Backward may run once per forward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(student_logits.shape) != 3:
        raise ValueError(f"student_logits must be B×T×V, got shape {tuple(student_logits.shape)}")
    bt = student_logits.shape[:2]
    if mask.shape != bt:
        raise ValueError(f"mask must be B×T = {tuple(bt)}, got {tuple(mask.shape)}")
    for o in others:
        if o.shape[:2] != bt:
            raise ValueError(f"every other tensor must start with B×T = {tuple(bt)}, got {tuple(o.shape)}")
    if weights is not None and weights.shape != bt:
        raise ValueError(f"weights must be B×T = {tuple(bt)}, got {tuple(weights.shape)}")

    if weights is None:
        return chunked_rows_loss(per_token_fn, (student_logits,), mask, *others, chunk_size=chunk_size, terms=terms)

    def weighted(s: torch.Tensor, *rest: torch.Tensor):  # the weights ride along as an "other"
        *rows, w = rest
        out = per_token_fn(s, *rows)
        values, named = out if terms else (out, None)
        return (values * w.to(s.dtype), named) if terms else values * w.to(s.dtype)

    return chunked_rows_loss(weighted, (student_logits,), mask, *others, weights, chunk_size=chunk_size, terms=terms)


# ------------------------------------------------------------------------------------------ several inputs
@dataclass
class RowFeatures:
    """Differentiable per-row features of ``inputs[0]`` (the student logits) at some rows, returned next to the
    chunked sum by :func:`chunked_rows_loss` without a second gradient buffer.

    index: N flat row indices into the B·T positions (``b·T + t``: ``inputs[0].view(-1, V)`` for logits; for a
    :class:`HiddenRows` input, the rows of its hidden states, projected per chunk).
    select(rows n×V) -> n×k int64: which entries to keep (run under no_grad, once; ties then resolve once).
    value(rows n×V, idx n×k) -> n×k: the differentiable features; None: the logits themselves, ``rows.gather(1,
    idx)``, whose gradient is sparse: for a HiddenRows input the engine then writes it from the head's rows at idx
    (g·W[idx] to the hidden states, gᵀh into W[idx]) without projecting the rows again.
    """

    index: torch.Tensor
    select: Callable[[torch.Tensor], torch.Tensor]
    value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def values(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The features of ``rows`` (n×V) at ``idx`` (n×k): ``value``, or the gathered logits."""
        return rows.gather(1, idx) if self.value is None else self.value(rows, idx)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x.dtype))


def _chunks(mask: torch.Tensor, chunk_size: int):
    """The masked positions of a B×T ``mask``, as (rows, cols) index pairs of at most ``chunk_size`` each."""
    rows, cols = mask.nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        yield rows[start:start + chunk_size], cols[start:start + chunk_size]


def _split_terms(out, terms: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn's return: n values, or with ``terms`` (values, {name: n values}) -> (values, the named rows in order)."""
    if not terms:
        return out, []
    values, named = out
    missing = [t for t in terms if t not in named]
    if missing:
        raise ValueError(f"fn must return (values, {{name: values}}) with the terms {list(terms)}; missing {missing}")
    return values, [named[t] for t in terms]


class _LogitsSlot:
    """A logits input (B×T×V) of :func:`_row_loop`; when it wants a gradient, one buffer shaped like it (``buffers``:
    the one to write into instead, or None)."""

    def __init__(self, logits: torch.Tensor, wants: Sequence[bool], buffers: Sequence[torch.Tensor | None] = ()):
        self.logits, self.dtype = logits, logits.dtype
        if buffers:
            self.buffer = buffers[0]
        else:
            self.buffer = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device) if wants[0] else None
        self.wants = self.buffer is not None

    def leaf(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The rows at (r, c), upcast: n×V, a leaf that records fn's gradient when wanted."""
        return _upcast(self.logits[r, c]).detach().requires_grad_(self.wants)

    @staticmethod
    def rows(leaf: torch.Tensor) -> torch.Tensor:
        """What fn reads: the leaf itself."""
        return leaf

    def store(self, r: torch.Tensor, c: torch.Tensor, grad: torch.Tensor, accumulate: bool = False) -> None:
        """Write (``accumulate``: add) the rows' gradient at (r, c)."""
        self.buffer.index_put_((r, c), grad.to(self.buffer.dtype), accumulate=accumulate)

    def buffers(self) -> list[torch.Tensor | None]:
        return [self.buffer]


class _HiddenSlot:
    """A :class:`HiddenRows` input of :func:`_row_loop`. The leaf is the head's linear map z = h Wᵀ + b of the chunk's
    hidden rows (n×V, upcast); fn reads the finished logits. Its gradient g (n×V) becomes g·W in the hidden states'
    buffer (B×T×H), gᵀ·h added into the weight's (V×H, fp32) and Σ_rows g into the bias's (V). ``buffers``: the ones
    to write into instead (one per tensor of the input, None where none is wanted)."""

    def __init__(self, rows: HiddenRows, wants: Sequence[bool], buffers: Sequence[torch.Tensor | None] = ()):
        self.head, self.hidden, self.dtype = rows.head, rows.hidden.detach(), rows.dtype
        dtype = _compute_dtype(self.dtype)

        def buffer(t: torch.Tensor, want: bool, as_dtype: torch.dtype) -> torch.Tensor | None:
            return torch.zeros(t.shape, dtype=as_dtype, device=t.device) if want else None

        self._buffers = list(buffers) if buffers else [
            buffer(self.hidden, wants[0], self.hidden.dtype),
            *(buffer(t, w, dtype) for t, w in zip(rows.tensors()[1:], wants[1:]))]
        self.wants = any(b is not None for b in self._buffers)
        wants_hidden = self._buffers[0] is not None
        self.weight = _upcast(self.head.weight.detach()) if wants_hidden else None  # W in fp32 once, for g·W

    def leaf(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z = h Wᵀ + b at the rows (r, c), upcast: n×V, a leaf that records fn's gradient when wanted."""
        with torch.no_grad():
            z = _upcast(self.head.linear(self.hidden[r, c]))
        return z.requires_grad_(self.wants)

    def rows(self, leaf: torch.Tensor) -> torch.Tensor:
        """What fn reads: the head's scale and soft cap applied to the leaf (the model's own logits)."""
        return self.head.finish(leaf)

    def store(self, r: torch.Tensor, c: torch.Tensor, grad: torch.Tensor, accumulate: bool = False) -> None:
        """Write (``accumulate``: add) g·W at the hidden rows (r, c); add gᵀ·h and Σ g into the head's buffers."""
        hidden, weight, *bias = self._buffers
        if hidden is not None:
            hidden.index_put_((r, c), (grad @ self.weight).to(hidden.dtype), accumulate=accumulate)
        if weight is not None:
            weight.addmm_(grad.t(), self.hidden[r, c].to(grad.dtype))
        if bias and bias[0] is not None:
            bias[0].add_(grad.sum(0))

    def buffers(self) -> list[torch.Tensor | None]:
        return list(self._buffers)


def _tensors(x: Logits) -> tuple[torch.Tensor, ...]:
    """The tensors of one input that may receive a gradient."""
    return x.tensors() if isinstance(x, HiddenRows) else (x,)


def _slot(x: Logits, wants: Sequence[bool], buffers: Sequence[torch.Tensor | None] = ()):
    """The slot of one input (:class:`_LogitsSlot` or :class:`_HiddenSlot`), with new buffers where ``wants`` (one
    per tensor of :func:`_tensors`), or writing into ``buffers``."""
    return (_HiddenSlot if isinstance(x, HiddenRows) else _LogitsSlot)(x, wants, buffers)


def _per_input(inputs: Sequence[Logits], flat: Sequence) -> list[tuple[Logits, Sequence]]:
    """Each input with its part of ``flat``, a sequence with one entry per tensor of :func:`_tensors` of every
    input, in order."""
    parts, start = [], 0
    for x in inputs:
        n = len(_tensors(x))
        parts.append((x, flat[start:start + n]))
        start += n
    return parts


def _slots(inputs: Sequence[Logits], wants: Sequence[bool]) -> list[_LogitsSlot | _HiddenSlot]:
    """One slot per input; ``wants``: per tensor of :func:`_tensors` of every input, flat, whether it needs a
    gradient."""
    return [_slot(x, own) for x, own in _per_input(inputs, wants)]


def _chunk(fn, slots, r, c, others, terms: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Σ fn(rows...) over the chunk's rows (r, c), [Σ of each named term]), both detached; each slot that wants a
    gradient stores d(sum)/d(its rows). Its n×V work dies when it returns, before the next chunk starts."""
    leaves = [slot.leaf(r, c) for slot in slots]
    rest = [o[r, c] for o in others]
    with torch.enable_grad():
        values, named = _split_terms(fn(*[slot.rows(x) for slot, x in zip(slots, leaves)], *rest), terms)
        if values.shape != (r.numel(),):
            raise ValueError(f"fn must return one value per row ({r.numel()},), got {tuple(values.shape)}")
        chunk = values.sum()
        wanted = [(leaf, slot) for leaf, slot in zip(leaves, slots) if slot.wants]
        if wanted and chunk.requires_grad:
            grads = torch.autograd.grad(chunk, [leaf for leaf, _ in wanted], allow_unused=True)
            for (_, slot), g in zip(wanted, grads):
                if g is not None:
                    slot.store(r, c, g)
    return chunk.detach(), [v.detach().sum() for v in named]


def _row_loop(fn, slots, mask, others, chunk_size, terms: Sequence[str] = ()):
    """(Σ_masked fn(rows...), [Σ_masked of each named term, detached]) in chunks (:func:`_chunk`); each slot that
    wants a gradient stores d(sum)/d(its rows) per chunk (:meth:`_LogitsSlot.store`, :meth:`_HiddenSlot.store`)."""
    total = None
    dtype = _compute_dtype(slots[0].dtype)
    term_sums = [torch.zeros((), dtype=dtype, device=mask.device) for _ in terms]
    for r, c in _chunks(mask, chunk_size):
        chunk, named = _chunk(fn, slots, r, c, others, terms)
        term_sums = [acc + v.to(acc.dtype) for acc, v in zip(term_sums, named)]
        total = chunk if total is None else total + chunk
    if total is None:
        total = torch.zeros((), dtype=dtype, device=mask.device)
    return total, term_sums


def _feature_chunks(index: torch.Tensor, width: int, chunk_size: int):
    """(slice of ``index``, rows, cols) per chunk of the flat row indices ``index`` (``b·width + t``)."""
    for start in range(0, index.numel(), chunk_size):
        flat = index[start:start + chunk_size]
        yield slice(start, start + chunk_size), flat.div(width, rounding_mode="floor"), flat.remainder(width)


@torch.no_grad()
def _feature_loop(source: Logits, features: RowFeatures, chunk_size: int):
    """(values N×k, idx N×k) of ``features`` on the rows of ``source`` (B×T×V logits, or :class:`HiddenRows`
    projected per chunk), chunked, no grad."""
    slot = _slot(source.detach(), [False] * len(_tensors(source)))
    values, indices = [], []
    for _, r, c in _feature_chunks(features.index, source.shape[1], chunk_size):
        rows = slot.rows(slot.leaf(r, c))
        idx = features.select(rows)
        values.append(features.values(rows, idx))
        indices.append(idx)
    if not values:
        return (torch.zeros(0, 0, dtype=_compute_dtype(source.dtype), device=source.device),
                features.index.new_zeros(0, 0))
    return torch.cat(values), torch.cat(indices)


def _feature_backward(source: Logits, buffers: Sequence[torch.Tensor | None], features: RowFeatures,
                      idx: torch.Tensor, grad_values: torch.Tensor, chunk_size: int) -> None:
    """Add the features' vector-Jacobian product with ``grad_values`` (N×k) into ``buffers`` (the source's, one per
    tensor of :func:`_tensors`), recomputing each chunk's rows with a graph (HiddenRows: projected again)."""
    slot = _slot(source.detach(), [], buffers)
    if not slot.wants:
        return
    for sl, r, c in _feature_chunks(features.index, source.shape[1], chunk_size):
        leaf = slot.leaf(r, c)
        with torch.enable_grad():
            values = features.values(slot.rows(leaf), idx[sl])
            (g,) = torch.autograd.grad(values, leaf, grad_values[sl].to(values.dtype))
        slot.store(r, c, g, accumulate=True)


def _gathered_backward(source: HiddenRows, buffers: Sequence[torch.Tensor | None], index: torch.Tensor,
                       idx: torch.Tensor, values: torch.Tensor, grad_values: torch.Tensor, chunk_size: int) -> None:
    """Add the gradient of gathered logits (``RowFeatures.value`` None: y = finish(z)[idx] at the flat rows
    ``index``, N×k) with ``grad_values`` into a HiddenRows input's ``buffers`` without projecting any row: per chunk
    g_z = grad·finish'(z) (read off the values y themselves), then g_z·W[idx] into the hidden rows, g_zᵀ·h into the
    weight's rows idx and Σ g_z into the bias at idx. O(N·k·H) work instead of O(N·V·H)."""
    hidden_buffer, weight_buffer, *bias_buffer = buffers
    head, hidden = source.head, source.hidden.detach()
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight = _upcast(head.weight.detach())
    for start in range(0, index.numel(), chunk_size):
        rows, cols = index[start:start + chunk_size], idx[start:start + chunk_size]
        g = grad_values[start:start + chunk_size].to(weight.dtype) * head.finish_grad(
            values[start:start + chunk_size].to(weight.dtype))  # n×k
        if hidden_buffer is not None:
            flat = hidden_buffer.view(-1, hidden_buffer.shape[-1])
            flat.index_add_(0, rows, torch.bmm(g.unsqueeze(1), weight[cols]).squeeze(1).to(flat.dtype))
        if weight_buffer is not None:
            h = hidden[rows].to(weight.dtype)
            weight_buffer.index_add_(0, cols.reshape(-1), (g.unsqueeze(-1) * h.unsqueeze(1)).reshape(-1, h.shape[-1]))
        if bias_buffer and bias_buffer[0] is not None:
            bias_buffer[0].index_add_(0, cols.reshape(-1), g.reshape(-1))


class _ChunkedRows(torch.autograd.Function):
    """Forward: the chunked sum with the gradients precomputed into buffers (one per tensor of each input, see
    :func:`_slots`), and the features. Backward: buffer·g, plus the features' gradient recomputed per chunk and added
    into the first input's buffers. ``inputs`` are the input objects; ``tensors`` their tensors (:func:`_tensors`,
    flat, for the graph), then the others."""

    @staticmethod
    def forward(ctx, fn, mask, chunk_size, inputs, features, terms, numbers, *tensors):
        n_flat = sum(len(_tensors(x)) for x in inputs)
        flat, others = tensors[:n_flat], tensors[n_flat:]
        wants = ctx.needs_input_grad[7:7 + n_flat]
        slots = _slots(inputs, wants)
        buffers = [b for slot in slots for b in slot.buffers()]
        if numbers is not None:  # gathered logits of a HiddenRows input: taken in the sum's pass
            total, term_sums, values, idx = _sum_and_features(fn, slots, mask, others, chunk_size, terms, features,
                                                              numbers)
        else:
            total, term_sums = _row_loop(fn, slots, mask, others, chunk_size, terms)
        del slots  # with them the fp32 copy of a head's weight
        ctx.mark_non_differentiable(*term_sums)
        ctx.wants, ctx.dtypes = [b is not None for b in buffers], [t.dtype for t in flat]
        ctx.n_others, ctx.consumed, ctx.chunk_size = len(others), False, chunk_size
        if features is None:
            ctx.save_for_backward(*[b for b in buffers if b is not None])
            return (total, *term_sums)
        if numbers is None:
            values, idx = _feature_loop(inputs[0], features, chunk_size)
        ctx.features, ctx.source, ctx.n_first = features, inputs[0].detach(), len(_tensors(inputs[0]))
        ctx.sparse = numbers is not None
        ctx.save_for_backward(*[b for b in buffers if b is not None], idx, values if ctx.sparse else None)
        return (total, values, *term_sums)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, *grad_rest):
        grad_values = grad_rest[0] if getattr(ctx, "features", None) is not None else None
        if ctx.consumed:
            raise RuntimeError("chunked_rows_loss: backward can run only once per forward (buffers are scaled in "
                               "place); recompute the loss instead of retain_graph=True")
        ctx.consumed = True
        saved = list(ctx.saved_tensors)
        buffers = [saved.pop(0) if w else None for w in ctx.wants]
        for buffer in buffers:
            if buffer is not None:
                buffer.mul_(grad_output.to(buffer.dtype))
        if grad_values is not None and ctx.sparse:
            _gathered_backward(ctx.source, buffers[:ctx.n_first], ctx.features.index, saved[0], saved[1],
                               grad_values, ctx.chunk_size)
        elif grad_values is not None:
            _feature_backward(ctx.source, buffers[:ctx.n_first], ctx.features, saved[0], grad_values, ctx.chunk_size)
        grads = [None if b is None else b.to(dtype) for b, dtype in zip(buffers, ctx.dtypes)]
        return (None,) * 7 + (*grads, *([None] * ctx.n_others))


# ------------------------------------------------ features in the sum's own pass (fused heads): recompute in backward
def _feature_numbers(features: RowFeatures, mask: torch.Tensor) -> torch.Tensor | None:
    """B×T long: at each row of ``features.index`` its number i (0..N−1), −1 elsewhere; None unless every feature
    row is a distinct masked row (then the features can ride in the sum's chunks)."""
    flat = torch.full((mask.numel(),), -1, dtype=torch.long, device=mask.device)
    flat[features.index] = torch.arange(features.index.numel(), device=mask.device)
    if int(flat.ge(0).sum()) != features.index.numel() or not bool(mask.reshape(-1)[features.index].all()):
        return None
    return flat.view(mask.shape)


def _feature_rows(rows: torch.Tensor, number: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the chunk's rows that carry a feature, their feature numbers); no copy when every row carries one."""
    sel = number.ge(0)
    if bool(sel.all()):
        return rows, number
    return rows[sel], number[sel]


def _sum_and_features(fn, slots, mask, others, chunk_size, terms, features: RowFeatures, numbers: torch.Tensor):
    """One chunked pass: (Σ_masked fn, [term sums], feature values N×k, their indices N×k), the features without a
    gradient; slots that want one store fn's (:func:`_chunk`). Each chunk's rows of the first input are projected
    once and serve both fn and the features."""
    found: dict[str, torch.Tensor] = {}
    n = features.index.numel()

    def both(*args):
        *rest, number = args
        rows, number = _feature_rows(args[0], number)
        if number.numel():
            with torch.no_grad():
                idx = features.select(rows)
                values = features.values(rows, idx)
            if not found:
                found["values"] = values.new_zeros(n, values.shape[-1])
                found["idx"] = idx.new_zeros(n, idx.shape[-1])
            found["values"][number], found["idx"][number] = values, idx
        return fn(*rest)

    total, term_sums = _row_loop(both, slots, mask, (*others, numbers), chunk_size, terms)
    if not found:
        found = {"values": torch.zeros(0, 0, dtype=total.dtype, device=mask.device),
                 "idx": features.index.new_zeros(0, 0)}
    return total, term_sums, found["values"], found["idx"]


def _rebuild_inputs(inputs: Sequence[Logits], tensors: Sequence[torch.Tensor]) -> list[Logits]:
    """Every input with its tensors replaced by ``tensors`` (flat, :func:`_tensors` order)."""
    return [_rebuild(x, own) for x, own in _per_input(inputs, tensors)]


class _ChunkedRowsShared(torch.autograd.Function):
    """:class:`_ChunkedRows` for a :class:`HiddenRows` first input whose features lie on the sum's rows. Forward:
    one pass without gradient (:func:`_sum_and_features`). Backward: one pass that recomputes each chunk with a graph
    and stores the gradient of g·fn + ⟨features, g_features⟩ into the buffers. Per chunk the head projects the rows
    twice (forward, backward) instead of three times for the precomputed sum plus twice for the features' own passes,
    and the head weight's V×H buffer takes one accumulation instead of two."""

    @staticmethod
    def forward(ctx, fn, mask, chunk_size, inputs, features, terms, numbers, others, *tensors):
        slots = _slots(inputs, [False] * len(tensors))
        total, term_sums, values, idx = _sum_and_features(fn, slots, mask, others, chunk_size, terms, features,
                                                          numbers)
        ctx.mark_non_differentiable(*term_sums)
        ctx.fn, ctx.chunk_size, ctx.inputs, ctx.features, ctx.terms = fn, chunk_size, inputs, features, terms
        ctx.others, ctx.consumed = others, False
        ctx.save_for_backward(mask, numbers, idx, *tensors)
        return (total, values, *term_sums)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_values, *grad_terms):
        if ctx.consumed:
            raise RuntimeError("chunked_rows_loss: backward can run only once per forward; recompute the loss "
                               "instead of retain_graph=True")
        ctx.consumed = True
        mask, numbers, idx, *tensors = ctx.saved_tensors
        wants = ctx.needs_input_grad[8:]
        slots = _slots(_rebuild_inputs(ctx.inputs, tensors), wants)
        fn, features, terms = ctx.fn, ctx.features, ctx.terms

        def inner(*args):  # g·fn(rows...) + ⟨features(rows), g_features⟩ per row: n
            *rest, number = args
            values, _ = _split_terms(fn(*rest), terms)
            out = values * grad_output.to(values.dtype)
            rows, picked = _feature_rows(args[0], number)
            if picked.numel():
                g = grad_values[picked].to(values.dtype)
                extra = (features.values(rows, idx[picked]) * g).sum(-1)
                out = out + extra if picked.numel() == number.numel() else \
                    out.index_add(0, number.ge(0).nonzero().squeeze(-1), extra)
            return out

        _row_loop(inner, slots, mask, (*ctx.others, numbers), ctx.chunk_size)
        buffers = [b for slot in slots for b in slot.buffers()]
        grads = [None if b is None else b.to(t.dtype) for b, t in zip(buffers, tensors)]
        return (None,) * 8 + tuple(grads)


def chunked_rows_loss(fn: Callable[..., torch.Tensor], inputs: Sequence[Logits], mask: torch.Tensor,
                      *others: Logits, chunk_size: int = 1024, features: RowFeatures | None = None,
                      terms: Sequence[str] = ()):
    """Σ_{(b,t): mask[b,t]} fn(inputs[0][b,t], ..., others[0][b,t], ...), chunked, with gradients w.r.t. every
    input that requires grad (one buffer shaped like each; others are read detached).

    inputs: B×T×D_k tensors (any float dtype; rows reach fn upcast to fp32 at least), or :class:`HiddenRows` (fn
    reads their projected logit rows; the gradient reaches the hidden states and the head); mask: B×T bool;
    others: B×T×... tensors or :class:`HiddenRows`. fn(rows of inputs [n×D_k]..., rows of others...) -> n values.
    features: optional :class:`RowFeatures` of ``inputs[0]``; then returns (sum, N×k features), whose gradient
    lands in the same buffers as the sum's (one logits-sized tensor in all; for a HiddenRows input, the hidden
    states' and the head's, the rows projected again per chunk in backward).
    terms: names of per-row quantities to sum beside the loss (its parts, for metrics): fn then returns
    (values, {name: n values}), and the result gets one more element, {name: Σ_masked, detached scalar}.
    Returns a scalar sum (fp32 at least). Backward may run once per forward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bt = mask.shape
    for t in (*inputs, *others):
        if t.shape[:2] != bt:
            raise ValueError(f"every tensor must start with B×T = {tuple(bt)}, got {tuple(t.shape)}")
    mask = mask.detach().bool()
    others = tuple(o.detach() for o in others)
    terms = tuple(terms)
    tensors = [t for x in inputs for t in _tensors(x)]
    # fused head with features on the sum's rows: taken in the sum's own pass (gathered logits: their sparse gradient
    # in backward, _gathered_backward; any other features: recomputed with the sum in backward, _ChunkedRowsShared)
    numbers = _feature_numbers(features, mask) if features is not None and isinstance(inputs[0], HiddenRows) \
        else None
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        if numbers is not None and features.value is not None:
            structure = tuple(x.detach() for x in inputs)
            out = _ChunkedRowsShared.apply(fn, mask, chunk_size, structure, features, terms, numbers, others,
                                           *tensors)
        else:
            out = _ChunkedRows.apply(fn, mask, chunk_size, tuple(inputs), features, terms, numbers, *tensors,
                                     *others)
    else:
        with torch.no_grad():
            slots = _slots(inputs, [False] * len(tensors))
            if numbers is not None:
                total, term_sums, values, _ = _sum_and_features(fn, slots, mask, others, chunk_size, terms,
                                                                features, numbers)
                head = (total, values)
            else:
                total, term_sums = _row_loop(fn, slots, mask, others, chunk_size, terms)
                head = (total,) if features is None else (total, _feature_loop(inputs[0], features, chunk_size)[0])
            out = (*head, *term_sums)
    head, term_sums = out[:len(out) - len(terms)], out[len(out) - len(terms):]
    result = (*head, dict(zip(terms, term_sums))) if terms else head
    return result[0] if len(result) == 1 else result


# ------------------------------------------------------------------------ per-row terms (no sum): recompute in backward
RowTermsFn = Callable[..., torch.Tensor]  # (rows n×V, *other rows) -> n×K


def _terms_loop(fn: RowTermsFn, k: int, slot: _LogitsSlot | _HiddenSlot, mask: torch.Tensor,
                others: tuple[Logits, ...], chunk_size: int) -> torch.Tensor:
    """B×T×K values of ``fn`` on the rows of one input (its slot, wanting no gradient) at the masked positions (0
    elsewhere), chunked, no graph."""
    dtype = _compute_dtype(slot.dtype)
    out = torch.zeros(*mask.shape, k, dtype=dtype, device=mask.device)
    for r, c in _chunks(mask, chunk_size):
        out[r, c] = fn(slot.rows(slot.leaf(r, c)), *[o[r, c] for o in others]).to(dtype)
    return out


def _rebuild(source: Logits, tensors: Sequence[torch.Tensor]) -> Logits:
    """``source`` with its tensors (:func:`_tensors`) replaced by ``tensors`` (the ones saved for backward)."""
    if not isinstance(source, HiddenRows):
        return tensors[0]
    hidden, weight, *bias = tensors
    return HiddenRows(hidden, replace(source.head, weight=weight, bias=bias[0] if bias else None))


class _ChunkedRowTerms(torch.autograd.Function):
    """Forward: per-row terms B×T×K, chunked under no_grad. Backward: per chunk, recompute the rows with a graph and
    write their vector-Jacobian product with the incoming B×T×K gradient into the input's buffers (one shaped like
    the logits; or, for :class:`HiddenRows`, B×T×H, V×H and V: :class:`_HiddenSlot`). ``source`` is the input
    object, ``tensors`` its tensors (:func:`_tensors`, for the graph)."""

    @staticmethod
    def forward(ctx, fn, k, mask, chunk_size, source, others, *tensors):
        out = _terms_loop(fn, k, _slot(source, [False] * len(tensors)), mask, others, chunk_size)
        ctx.fn, ctx.chunk_size, ctx.others, ctx.consumed = fn, chunk_size, others, False
        ctx.source = source.detach()  # its structure (the head's settings); the tensors are saved
        ctx.save_for_backward(mask, *tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError("chunked_row_terms: backward can run only once per forward (the gradient is "
                               "recomputed into one buffer); recompute the terms instead of retain_graph=True")
        ctx.consumed = True
        mask, *tensors = ctx.saved_tensors
        wants = ctx.needs_input_grad[6:]
        slot = _slot(_rebuild(ctx.source, tensors), wants)
        fn = ctx.fn

        def inner(rows: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:  # ⟨fn(rows), g⟩ per row: n
            *other_rows, g = rest
            values = fn(rows, *other_rows)
            return (values * g.to(values.dtype)).sum(-1)

        # the gradient of Σ ⟨fn, grad_out⟩ over the chunks, stored per chunk by the slot (_chunk, as the sums do)
        _row_loop(inner, [slot], mask, (*ctx.others, grad_out), ctx.chunk_size)
        grads = [None if b is None else b.to(t.dtype) for b, t in zip(slot.buffers(), tensors)]
        return (None, None, None, None, None, None, *grads)


def chunked_row_terms(fn: RowTermsFn, k: int, logits: Logits, mask: torch.Tensor, *others: Logits,
                      chunk_size: int = 1024) -> torch.Tensor:
    """B×T×K per-row terms fn(logits[b,t], others[b,t]...) at the masked positions (0 elsewhere), chunked.

    The other strategy of this engine, for terms that are not summed at once (per-token log-probs whose per-sequence
    sums then enter a nonlinearity, as in DPO): the forward keeps no graph, and the backward recomputes each chunk
    and writes d(⟨grad_out, terms⟩)/d(logits) into one logits-shaped buffer. Under no_grad (or for logits that need
    no gradient) it is a plain chunked computation. Backward may run once per forward.

    logits: B×T×V, or :class:`HiddenRows` (each chunk's rows projected from the hidden states; the backward
    recomputes them from the head's linear map z and writes g·W into a B×T×H buffer, gᵀ·h into a V×H fp32 one for
    the head's weight and Σg into its bias). others: B×T×... tensors or :class:`HiddenRows` (projected per chunk),
    read detached. Returns B×T×K (fp32; fp64 for fp64 logits).
    """
    mask = mask.detach().bool()
    others = tuple(o.detach() for o in others)
    tensors = _tensors(logits)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedRowTerms.apply(fn, k, mask, chunk_size, logits, others, *tensors)
    with torch.no_grad():
        return _terms_loop(fn, k, _slot(logits, [False] * len(tensors)), mask, others, chunk_size)
