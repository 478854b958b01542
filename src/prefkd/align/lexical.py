"""The lexical cost of MCW-KD's hidden-state branch (docs/methods.md §8), precomputed by the data pipeline.

C_lex[j, i] = Lev(t_j, s_i) / max(|t_j|, |s_i|) between the texts of the tokens of teacher point j and student point
i, the FULL matrix (the released code filled it only on a DTW path and left 0
elsewhere, which made unrelated tokens free to match).

Token text. ``tokenizer.decode([id]).strip()``: the word-start marker (a space once decoded) and surrounding
whitespace removed, and byte tokens compared as text, so GPT-2's ``Ċ`` and SentencePiece's ``<0x0A>`` (both a
newline) match across tokenizer families (raw token strings would not). Memoised per id.

Points. A position i carries the token it predicts, ``full_ids[i + 1]`` (= ``labels[i]`` on response positions;
DSKD's pre-shifted convention). The points of a side are its response positions (``labels != -100``), in order,
or every position when ``include_prompt``. The field ``lex_cost`` is m_pts × n_pts (teacher points × student
points) in fp16 (values in [0, 1]; 1e-3 precision is plenty and halves the cache); the collator zero-pads it.
"""

from __future__ import annotations

import torch

from prefkd.utils.labels import IGNORE_INDEX

FIELD = "lex_cost"


def point_positions(labels: list[int], include_prompt: bool) -> list[int]:
    """Positions that are OT points: response positions (labels ≠ −100), or all of them with ``include_prompt``."""
    return list(range(len(labels))) if include_prompt else [i for i, y in enumerate(labels) if y != IGNORE_INDEX]


def point_tokens(example, include_prompt: bool) -> list[int]:
    """The token id each point predicts: ``full_ids[i + 1]`` for the point positions i of a TokenizedExample."""
    full = example.full_ids
    return [full[i + 1] for i in point_positions(example.labels, include_prompt)]


class LexicalCost:
    """Precompute hook (:class:`prefkd.data.dataset.DistillDataset`): ``{"lex_cost": m_pts × n_pts fp16}``."""

    pad_values = {FIELD: 0.0}  # padded rows and columns cost 0 (the OT terms mask them)

    def __init__(self, teacher_tokenizer, student_tokenizer, include_prompt: bool = False):
        from prefkd.ot.costs import normalized_edit_distance_matrix  # needs rapidfuzz (the align extra)

        self._matrix = normalized_edit_distance_matrix
        self.include_prompt = bool(include_prompt)
        self._texts: dict[str, dict[int, str]] = {"teacher": {}, "student": {}}
        self.version = f"lex-2-prompt{int(self.include_prompt)}"

    def token_texts(self, tokenizer, ids: list[int], side: str) -> list[str]:
        """``decode([id]).strip()`` per id, memoised per side ("teacher" or "student") and id."""
        memo = self._texts[side]
        for i in ids:
            if i not in memo:
                memo[i] = tokenizer.decode([i]).strip()
        return [memo[i] for i in ids]

    def __call__(self, record, student, teacher, student_tokenizer, teacher_tokenizer) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("the lexical cost needs a teacher tokenizer (pick a teacher, not teacher=none)")
        t = self.token_texts(teacher_tokenizer, point_tokens(teacher, self.include_prompt), "teacher")
        s = self.token_texts(student_tokenizer, point_tokens(student, self.include_prompt), "student")
        cost = self._matrix(t, s, ("",), ("",))
        return {FIELD: cost.to(torch.float16)}
