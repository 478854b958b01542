"""MinED's per-example alignment as a data-pipeline precompute hook (docs/methods.md §6, FuseLLM / DSKD's ``minedit``).

Positions and targets. Each side is a :class:`~prefkd.data.tokenize.TokenizedExample`: ``labels[i]`` is the
token that the logits at sequence position i predict (``labels = full[1:]``, -100 on prompt targets). The
alignment works on TARGETS: the student's response positions are P_s = {j : labels_s[j] ≠ -100} (they
predict the response tokens and EOS), the teacher's P_t = {i : labels_t[i] ≠ -100}. With
y^s = labels_s[P_s] and y^t = labels_t[P_t] (in order), DTW (:mod:`prefkd.align.dtw`) aligns the strings
of y^t and y^s, word-start markers stripped. Student response position j is ALIGNED to teacher position i iff

    i is the only teacher response position that the DTW path pairs with j,  and  t2s[labels_t[i]] = labels_s[j],

with t2s the vocabulary map (:mod:`prefkd.align.vocab_map`). Then z^t[i] (teacher logits at sequence position
i, predicting labels_t[i]) is the teacher's distribution for the student's logits z^s[j] (predicting
labels_s[j]), both in their own sequence coordinates, so no shift is needed in the loss.

Output per example (a 1-D long tensor of the student's sequence length n, padded with -100 by ``collate``):

    mined_teacher_index[j] = i  (teacher sequence position)  if j is aligned,  else -100.

Prompt positions and unaligned response positions are -100; the loss uses a one-hot target on labels_s[j]
there. Per tokenizer pair (attributes, not per example):

    t2s_ids (V_t,) long: teacher id → student id, -1 where unmapped; ``map_to_tensor(aligner.t2s, V)`` resizes.
    s2t_ids (V_s,) long: student id → the lowest teacher id mapping to it, -1 if none.

The loss builds the aligned teacher logits in the student vocabulary from z^t[b, i] (V_t): either scatter
(z̃[t2s[v]] = z^t[v] for mapped v, reduce ``amax`` where several teacher ids share a student id, −inf elsewhere)
or gather (z̃[u] = z^t[s2t[u]] where s2t[u] ≥ 0, −inf elsewhere). FuseLLM keeps only the teacher's top-k logits
before mapping: ``top_k`` is carried here for the loss and does not change the precomputed fields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from prefkd.align.dtw import dtw_align
from prefkd.align.markers import strip_marker, vocab_strings, word_start_marker
from prefkd.align.vocab_map import invert_map, load_or_build_vocab_map, map_to_tensor
from prefkd.utils.labels import IGNORE_INDEX

FIELD = "mined_teacher_index"
VERSION = "mined-align-1"  # bump when the alignment rule changes


class MinEDAligner:
    """Precompute hook: ``aligner(record, student_ex, teacher_ex, student_tok, teacher_tok) -> dict``.
    Its field pads with -100 (``pad_values``: no alignment).

    ``vocab_map`` ``{teacher_id: student_id}``; default: :func:`load_or_build_vocab_map` (cached on disk).
    A partial map is allowed (unmapped teacher tokens are never aligned). Attributes: ``t2s`` (dict),
    ``t2s_ids``, ``s2t_ids`` (tensors, see the module docstring), ``top_k`` (for the loss), ``version``
    (pass it as the dataset's ``precompute_version``: it covers the rule and the map), ``stats`` (positions
    seen and aligned by this instance; a dataset loaded from its cache runs no hook, so use
    :func:`alignment_rate` on the data for the rate).
    """

    pad_values = {FIELD: IGNORE_INDEX}  # collate pads mined_teacher_index with "no teacher position"

    def __init__(self, teacher_tok, student_tok, vocab_map: Mapping[int, int] | None = None,
                 top_k: int | None = None):
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of teacher logits or None, got {top_k}")
        self.top_k = top_k
        self.t2s: dict[int, int] = ({int(k): int(v) for k, v in vocab_map.items()} if vocab_map is not None
                                    else load_or_build_vocab_map(teacher_tok, student_tok))
        self.s2t = invert_map(self.t2s)
        t_vocab, s_vocab = vocab_strings(teacher_tok), vocab_strings(student_tok)
        self.t2s_ids = map_to_tensor(self.t2s, max(len(t_vocab), max(self.t2s, default=-1) + 1))
        self.s2t_ids = map_to_tensor(self.s2t, max(len(s_vocab), max(self.s2t, default=-1) + 1))
        self._t2s_list = self.t2s_ids.tolist()
        t_marker, s_marker = word_start_marker(teacher_tok), word_start_marker(student_tok)
        self._t_str = [strip_marker(t or "", t_marker) for t in t_vocab]  # id → stripped string
        self._s_str = [strip_marker(s or "", s_marker) for s in s_vocab]
        digest = hashlib.sha256(repr(sorted(self.t2s.items())).encode()).hexdigest()[:16]
        self.version = f"{VERSION}:{digest}"
        self.stats = {"response_positions": 0, "aligned": 0}

    def align(self, student_labels: list[int], teacher_labels: list[int]) -> list[int]:
        """``mined_teacher_index`` (a list of len(student_labels)) from the two label lists."""
        s_pos = [j for j, y in enumerate(student_labels) if y != IGNORE_INDEX]
        t_pos = [i for i, y in enumerate(teacher_labels) if y != IGNORE_INDEX]
        out = [IGNORE_INDEX] * len(student_labels)
        if not s_pos or not t_pos:
            return out
        s_ids = [student_labels[j] for j in s_pos]
        t_ids = [teacher_labels[i] for i in t_pos]
        path = dtw_align([self._str(self._t_str, t) for t in t_ids], [self._str(self._s_str, s) for s in s_ids])
        partners: dict[int, list[int]] = {}
        for a, b in path:
            partners.setdefault(b, []).append(a)
        t2s, n_t2s = self._t2s_list, len(self._t2s_list)
        for b, aa in partners.items():
            if len(aa) == 1:
                t = t_ids[aa[0]]
                if 0 <= t < n_t2s and t2s[t] == s_ids[b]:
                    out[s_pos[b]] = t_pos[aa[0]]
        self.stats["response_positions"] += len(s_pos)
        self.stats["aligned"] += sum(v != IGNORE_INDEX for v in out)
        return out

    @staticmethod
    def _str(table: list[str], idx: int) -> str:
        return table[idx] if 0 <= idx < len(table) else ""

    def __call__(self, record, student_ex, teacher_ex, student_tok=None, teacher_tok=None) -> dict:
        if teacher_ex is None:
            raise ValueError("MinEDAligner needs the teacher's tokenisation: build the dataset with a teacher "
                             "tokenizer.")
        index = self.align(list(student_ex.labels), list(teacher_ex.labels))
        return {FIELD: torch.tensor(index, dtype=torch.long)}

    @property
    def alignment_rate(self) -> float:
        """Aligned / student response positions over every example this instance aligned (0 if none)."""
        return self.stats["aligned"] / max(self.stats["response_positions"], 1)


def alignment_rate(data: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Aligned student response positions / student response positions (``labels`` ≠ -100), for one batch
    or example (a dict with ``labels`` and ``mined_teacher_index``) or an iterable of them (a dataset)."""
    items = [data] if isinstance(data, Mapping) else data
    aligned = total = 0
    for ex in items:
        labels = torch.as_tensor(ex["labels"])
        total += int(labels.ne(IGNORE_INDEX).sum())
        aligned += int((torch.as_tensor(ex[FIELD]).ne(IGNORE_INDEX) & labels.ne(IGNORE_INDEX)).sum())
    return aligned / max(total, 1)
