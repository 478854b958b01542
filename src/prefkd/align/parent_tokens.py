"""Parent tokens: the finest segmentation of one response that both tokenizers respect (docs/methods.md §10).

One response string is tokenised by the student and by the teacher tokenizer, each giving a list of
character spans ``(start, end)`` (``return_offsets_mapping=True``, no special tokens). A *parent* is a
character range ``[start, end)`` together with the student tokens and the teacher tokens that make it
up (its *children*); parents are consecutive, start at 0 and cover the whole response, and every token
of either side belongs to exactly one parent. " unbelievably" is typically one parent made of two
student tokens and four teacher tokens.

**Boundaries.** boundaries = {0} ∪ (student cut positions ∩ teacher cut positions), where a side's *cut
positions* are its token end offsets at which its token sequence can really be cut in two:

    c is a cut after the first k tokens (0 < k < n)  iff  every token before k ends at or before c,
                                                         and c = the smallest start of the tokens from k on.

For ordinary tokenizations (each token starts where the previous one ends) these are exactly the token
end offsets of docs/methods.md §10. The rule only differs where offsets are not a clean tiling:

- **Overlapping spans never create a boundary.** SentencePiece's lone ``▁`` gets the span of the first
  character, e.g. ``▁`` (0, 1) then ``▁un`` (0, 3): 1 is an end offset but not a cut, because the next
  token starts at 0. Byte-fallback pieces of one character (an emoji as four ``<0xNN>`` tokens, all
  (6, 7)) and byte-level BPE tokens that end inside a character (GPT-2: ``ĠðŁĺ`` (5, 7) then ``Ģ``
  (6, 7)) likewise only cut after the last piece. A group of mutually overlapping tokens is therefore
  always owned by one parent as a whole, so no boundary is lost either: every cut that exists on both
  sides is used.
- **Gaps belong to the token before them.** A character that no token of a side covers (Qwen1.5's NFC
  normaliser turns ``e`` + U+0301 into one token whose span covers only the ``e``) is attached to the
  preceding token: the cut lies at the next token's start, not at the previous token's end. A gap before
  the first token belongs to the first parent, a gap after the last token to the last parent.
- **Zero-width tokens** ``(c, c)`` (not produced by the tokenizers of this project, but possible in
  offsets built elsewhere, e.g. a special token) belong to the parent that *ends* at c (the one on
  their left); at position 0 or at the end of the response, to the first or the last parent.

Internal boundaries lie strictly between 0 and the response length L (``length`` when given, and at
least the largest end offset of either side), so every parent holds at least one token of each side
(when both sides have tokens) and its children's spans lie in ``[start, end)``.

**Truncation and EOS.** Tokenise the whole response, build the parents, then :func:`truncate_parents`
keeps the longest prefix of whole parents that fits both token budgets (so the last parent never mixes
unequal spans). EOS is a config choice: either it is left out, or :func:`add_eos_parent` appends it as
its own zero-width parent ``[L, L)`` made of both sides' EOS token (the token right after the response).
In the preference pipeline this is the boolean ``eos`` argument of :func:`build_parents` /
:func:`response_parents` (default False: EOS excluded); when True the budgets include the EOS token.

**Log-probabilities.** :func:`parent_index_map` maps each token position to its parent index (−1 for
positions not in any parent: prompt, padding, truncated tokens) and :func:`parent_logprobs` sums token
log-probs into parent log-probs with one ``scatter_add``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

Offsets = Sequence[Sequence[int]]


@dataclass(frozen=True)
class Parent:
    """Characters ``[start, end)`` of the response and the token indices (into each side's tokenization
    of the response, in order) of its student and teacher children."""

    start: int
    end: int
    student: tuple[int, ...]
    teacher: tuple[int, ...]


def _spans(offsets: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    spans = [(int(s), int(e)) for s, e in offsets]
    bad = [(s, e) for s, e in spans if s < 0 or e < s]
    if bad:
        raise ValueError(f"invalid token spans {bad[:3]} (need 0 <= start <= end)")
    return spans


def cut_positions(offsets: Offsets) -> dict[int, int]:
    """The positions where one side's token sequence can be cut: ``{position c: k}`` meaning "the first k
    tokens lie in ``[.., c)`` and the rest in ``[c, ..)``", for 0 < k < n (see the module docstring).
    When several k give the same c (zero-width tokens at c), the largest k is kept."""
    spans = _spans(offsets)
    n = len(spans)
    suffix_min_start = [0] * (n + 1)
    suffix_min_start[n] = 1 << 62
    for i in range(n - 1, -1, -1):
        suffix_min_start[i] = min(spans[i][0], suffix_min_start[i + 1])
    cuts: dict[int, int] = {}
    prefix_max_end = 0
    for k in range(1, n):
        prefix_max_end = max(prefix_max_end, spans[k - 1][1])
        if prefix_max_end <= suffix_min_start[k]:
            cuts[suffix_min_start[k]] = k  # ascending k: the largest k wins
    return cuts


def parent_tokens(student_offsets: Offsets, teacher_offsets: Offsets, length: int | None = None) -> list[Parent]:
    """The parents of one response from both sides' token spans (rules in the module docstring).

    ``length`` is the length of the response string; the parents then tile ``[0, max(length, largest end
    offset))``. Without it they tile ``[0, largest end offset of either side)``. Both sides empty: ``[]``;
    one side empty (a tokenizer that produced nothing): one parent holding all tokens of the other side.
    """
    s_spans, t_spans = _spans(student_offsets), _spans(teacher_offsets)
    if not s_spans and not t_spans:
        return []
    total = max([length or 0] + [e for _, e in s_spans] + [e for _, e in t_spans])
    s_cuts, t_cuts = cut_positions(s_spans), cut_positions(t_spans)
    bounds = sorted(c for c in s_cuts.keys() & t_cuts.keys() if 0 < c < total)
    starts, ends = [0] + bounds, bounds + [total]
    s_ks = [0] + [s_cuts[c] for c in bounds] + [len(s_spans)]
    t_ks = [0] + [t_cuts[c] for c in bounds] + [len(t_spans)]
    return [Parent(a, b, tuple(range(s_ks[i], s_ks[i + 1])), tuple(range(t_ks[i], t_ks[i + 1])))
            for i, (a, b) in enumerate(zip(starts, ends))]


def truncate_parents(parents: Sequence[Parent], max_student: int | None = None,
                     max_teacher: int | None = None) -> list[Parent]:
    """The longest prefix of whole parents with at most ``max_student`` student tokens and at most
    ``max_teacher`` teacher tokens (None: no limit on that side)."""
    kept: list[Parent] = []
    n_student = n_teacher = 0
    for p in parents:
        n_student += len(p.student)
        n_teacher += len(p.teacher)
        if (max_student is not None and n_student > max_student) or \
                (max_teacher is not None and n_teacher > max_teacher):
            break
        kept.append(p)
    return kept


def _next_index(parents: Sequence[Parent], side: str) -> int:
    return max((i + 1 for p in parents for i in getattr(p, side)), default=0)


def add_eos_parent(parents: Sequence[Parent], n_student: int | None = None,
                   n_teacher: int | None = None) -> list[Parent]:
    """``parents`` plus one zero-width parent ``[L, L)`` (L = the end of the last parent) holding both
    sides' EOS token: student token index ``n_student`` and teacher token index ``n_teacher``, i.e. the
    token right after the response's (kept) tokens. None: right after the last token in ``parents``."""
    n_student = _next_index(parents, "student") if n_student is None else n_student
    n_teacher = _next_index(parents, "teacher") if n_teacher is None else n_teacher
    end = parents[-1].end if parents else 0
    return [*parents, Parent(end, end, (n_student,), (n_teacher,))]


def build_parents(student_offsets: Offsets, teacher_offsets: Offsets, length: int | None = None, *,
                  max_student: int | None = None, max_teacher: int | None = None,
                  eos: bool = False) -> list[Parent]:
    """Parents of the whole response, truncated at a parent boundary that fits both budgets, then (when
    ``eos``) the EOS parent. With ``eos`` the budgets count the EOS token too."""
    parents = parent_tokens(student_offsets, teacher_offsets, length)
    reserve = 1 if eos else 0
    parents = truncate_parents(parents, None if max_student is None else max_student - reserve,
                               None if max_teacher is None else max_teacher - reserve)
    return add_eos_parent(parents) if eos else parents


def token_offsets(text: str, tokenizer) -> list[tuple[int, int]]:
    """Character spans of the tokens of the response ``text``, tokenised as the data pipeline tokenises responses:
    no special tokens added, special tokens' strings in the text (``</s>``) taken as text (a fast tokenizer is
    needed)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    return [tuple(span) for span in encoding["offset_mapping"]]


def response_parents(text: str, student_tokenizer, teacher_tokenizer, *, max_student: int | None = None,
                     max_teacher: int | None = None, eos: bool = False) -> list[Parent]:
    """Tokenise one response string with both tokenizers and return its parents (:func:`build_parents`,
    ``length=len(text)``): token indices refer to ``tokenizer(text, add_special_tokens=False,
    split_special_tokens=True)``."""
    return build_parents(token_offsets(text, student_tokenizer), token_offsets(text, teacher_tokenizer),
                         len(text), max_student=max_student, max_teacher=max_teacher, eos=eos)


def parent_index_map(parents: Sequence[Parent], n_tokens: int, side: str = "student",
                     offset: int = 0) -> torch.LongTensor:
    """A LongTensor of ``n_tokens`` holding, for each position, the index of the parent that owns it, −1
    elsewhere. Token i of the response (on ``side``: "student" or "teacher") sits at position
    ``offset + i`` — e.g. the prompt length for a prompt+response sequence; positions beyond
    ``n_tokens`` are an error."""
    if side not in ("student", "teacher"):
        raise ValueError(f"side={side!r}: valid values are ['student', 'teacher'].")
    index = torch.full((n_tokens,), -1, dtype=torch.long)
    for p_idx, parent in enumerate(parents):
        for i in getattr(parent, side):
            pos = offset + i
            if not 0 <= pos < n_tokens:
                raise IndexError(f"{side} token {i} of parent {p_idx} at position {pos} is outside "
                                 f"0..{n_tokens - 1}")
            index[pos] = p_idx
    return index


def parent_logprobs(token_logps: torch.Tensor, index: torch.Tensor, num_parents: int) -> torch.Tensor:
    """Parent log-probs ``(..., num_parents)`` from token log-probs ``(..., T)`` and a parent index map of
    the same shape (:func:`parent_index_map`, stacked per row): ℓ_p = Σ_{t: index[t] = p} token_logps[t],
    by one ``scatter_add``; positions with index −1 are ignored (their value, even inf/nan, never enters).
    Differentiable in ``token_logps``; a parent without tokens gets 0."""
    if token_logps.shape != index.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and index {tuple(index.shape)} differ")
    if index.numel() and int(index.max()) >= num_parents:
        raise ValueError(f"parent index {int(index.max())} is out of range for num_parents={num_parents}")
    # Positions with index -1 go to an extra bin at the end, which is dropped.
    bins = torch.where(index >= 0, index, num_parents).long()
    out = token_logps.new_zeros(*token_logps.shape[:-1], num_parents + 1)
    return out.scatter_add(-1, bins, token_logps)[..., :num_parents]
