"""Tokenised preference pairs for training (docs/methods.md §10), with parent tokens when a teacher tokenizer is given.

Per pair and per response y ∈ {chosen, rejected}, for the student (and the teacher):

- prompt ids: ``tokenizer(prompt, add_special_tokens=False)``, keeping the LAST ``max_prompt_length`` tokens (the
  end of a dialogue matters most; the DPO reference code's convention);
- response ids: ``tokenizer(y, add_special_tokens=False, split_special_tokens=True)`` (with offsets; a special
  token's string in a response is text, never a BOS or EOS label), cut to the budget
  ``max_length − len(prompt ids)`` together with EOS. With a teacher, the response is cut at a PARENT boundary that
  fits both sides' budgets (:func:`prefkd.align.parent_tokens.build_parents`), so both sides keep the same string,
  and EOS is its own parent when ``eos_parent`` (else EOS is appended to both sides but owned by no parent);
- the DSKD/MiniLLM layout of docs/methods.md §1: ``input_ids = full[:-1]``, ``labels = full[1:]`` with −100 on prompt
  targets, so the target of position i is ``labels[i]``;
- ``parent_index``: per label position, the index of the parent owning that target token (−1: none, e.g. prompt);
  ``num_parents``; ``weight``: the pair's given per-parent weights (one per parent; else 1), checked for length.

:func:`collate_pairs` stacks a batch of B pairs into 2B rows, chosen first then rejected (one forward pass per
model, as the DPO reference code's concatenated forward): ``input_ids``, ``attention_mask``, ``labels``,
``parent_index``, ``parent_weight`` (2B×P, 0 on padding), ``reference_logps`` (2B, when every pair has them) and,
with a teacher, the ``teacher_*`` versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefkd.align.parent_tokens import build_parents, parent_index_map, token_offsets
from prefkd.data.chat import check_verbatim, end_of_turn_id, render_prompt
from prefkd.data.preference import PreferencePair
from prefkd.data.records import DataError
from prefkd.data.tokenize import ensure_pad_token
from prefkd.utils.labels import IGNORE_INDEX

SIDES = ("chosen", "rejected")


def _prompt_ids(tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:] if max_prompt_length > 0 else []


def _layout(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    full = prompt + response
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + response
    return full[:-1], labels


def _weights(given: Sequence[float] | None, n: int, where: str) -> list[float]:
    if given is None:
        return [1.0] * n
    if len(given) != n:
        raise DataError(f"{where}: {len(given)} weights for {n} parents; a weight file must hold one weight per "
                        f"parent of the response as tokenised now (same tokenizers, max_length, eos_parent); "
                        f"recompute the weights with `python -m prefkd.weights` for this configuration.")
    return [float(w) for w in given]


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenised pairs (module docstring). ``teacher_tokenizer=None``: student only, one parent per token."""

    def __init__(self, pairs: Sequence[PreferencePair], student_tokenizer, teacher_tokenizer=None,
                 max_length: int = 512, max_prompt_length: int = 256, eos_parent: bool = True,
                 source: str = "pairs"):
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
        self.student_tokenizer = ensure_pad_token(student_tokenizer)
        self.teacher_tokenizer = None if teacher_tokenizer is None else ensure_pad_token(teacher_tokenizer)
        self.max_length, self.max_prompt_length, self.eos_parent = max_length, max_prompt_length, eos_parent
        chat = any(isinstance(p.prompt, list) for p in pairs)  # the end of a chat answer: its template's (once)
        self.end_ids = {id(tok): end_of_turn_id(tok) for tok in (self.student_tokenizer, self.teacher_tokenizer)
                        if tok is not None and chat}
        self.examples = [self._encode(p, f"{source} pair {i + 1}") for i, p in enumerate(pairs)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        """Per pair, the longer student row (for length-grouped batches)."""
        return [max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) for ex in self.examples]

    @staticmethod
    def collate(examples: Sequence[dict], student_pad_id: int, teacher_pad_id: int | None = None) -> dict:
        return collate_pairs(examples, student_pad_id, teacher_pad_id)

    def _side(self, pair: PreferencePair, tokenizer, where: str) -> tuple[list[int], int]:
        """(prompt ids, the token ending an answer) of ``pair`` for one model: a conversation prompt rendered by its
        chat template (both answers checked to be written verbatim) and ended by the template's end of turn; a text
        prompt as it is, ended by EOS."""
        if not isinstance(pair.prompt, list):
            return _prompt_ids(tokenizer, pair.prompt, self.max_prompt_length), tokenizer.eos_token_id
        text = render_prompt(pair.prompt, tokenizer, where)
        for answer in (pair.chosen, pair.rejected):
            check_verbatim(pair.prompt, answer, tokenizer, text, where)
        return _prompt_ids(tokenizer, text, self.max_prompt_length), self.end_ids[id(tokenizer)]

    def _encode(self, pair: PreferencePair, where: str) -> dict:
        s_tok, t_tok = self.student_tokenizer, self.teacher_tokenizer
        s_prompt, s_end = self._side(pair, s_tok, where)
        t_prompt, t_end = (None, None) if t_tok is None else self._side(pair, t_tok, where)
        if not s_prompt or (t_prompt is not None and not t_prompt):
            raise DataError(f"{where}: the prompt is empty after tokenisation; every pair needs a prompt.")
        out = {}
        for side, text, given in (("chosen", pair.chosen, pair.chosen_weight),
                                  ("rejected", pair.rejected, pair.rejected_weight)):
            s_ids = s_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            budget_s = self.max_length - len(s_prompt)
            if t_tok is None:  # one parent per kept token (+ EOS)
                keep = s_ids[:budget_s - 1]
                n_par = len(keep) + (1 if self.eos_parent else 0)
                s_resp = keep + [s_end]
                index = torch.tensor([-1] * (len(s_prompt) - 1) + list(range(len(keep)))
                                     + ([len(keep)] if self.eos_parent else [-1]))
            else:
                t_ids = t_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                reserve = 0 if self.eos_parent else 1  # an EOS outside the parents still takes a position
                parents = build_parents(token_offsets(text, s_tok), token_offsets(text, t_tok), len(text),
                                        max_student=budget_s - reserve,
                                        max_teacher=self.max_length - len(t_prompt) - reserve, eos=self.eos_parent)
                n_s = sum(len(p.student) for p in parents) - (1 - reserve)  # response tokens before EOS
                n_t = sum(len(p.teacher) for p in parents) - (1 - reserve)
                s_resp = s_ids[:n_s] + [s_end]
                t_resp = t_ids[:n_t] + [t_end]
                n_par = len(parents)
                index = parent_index_map(parents, len(s_prompt) + len(s_resp) - 1, "student", len(s_prompt) - 1)
                t_index = parent_index_map(parents, len(t_prompt) + len(t_resp) - 1, "teacher", len(t_prompt) - 1)
                out[f"teacher_{side}_input_ids"], out[f"teacher_{side}_labels"] = _layout(t_prompt, t_resp)
                out[f"teacher_{side}_parent_index"] = t_index
            if n_par == 0:
                raise DataError(f"{where}: the {side} response keeps no token within max_length={self.max_length}"
                                f" (prompt {len(s_prompt)} tokens); raise max_length or lower max_prompt_length.")
            out[f"{side}_input_ids"], out[f"{side}_labels"] = _layout(s_prompt, s_resp)
            out[f"{side}_parent_index"] = index
            out[f"{side}_weight"] = _weights(given, n_par, f"{where} ({side})")
        if pair.reference_logps is not None:
            out["reference_logps"] = list(pair.reference_logps)
        return out


def _pad(rows: Sequence, value) -> torch.Tensor:
    rows = [torch.as_tensor(r) for r in rows]
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def collate_pairs(examples: Sequence[dict], student_pad_id: int, teacher_pad_id: int | None = None) -> dict:
    """B pairs → 2B rows (chosen rows 0..B−1, rejected rows B..2B−1), right-padded (module docstring)."""
    out = {}
    prefixes = [""] + (["teacher_"] if "teacher_chosen_input_ids" in examples[0] else [])
    for prefix in prefixes:
        pad_id = student_pad_id if not prefix else teacher_pad_id
        if pad_id is None:
            raise ValueError("collate_pairs needs the teacher pad id (tokenizer.pad_token_id)")
        ids = [torch.as_tensor(ex[f"{prefix}{s}_input_ids"]) for s in SIDES for ex in examples]
        out[f"{prefix}input_ids"] = _pad(ids, pad_id)
        out[f"{prefix}attention_mask"] = _pad([torch.ones(len(r), dtype=torch.long) for r in ids], 0)
        out[f"{prefix}labels"] = _pad([ex[f"{prefix}{s}_labels"] for s in SIDES for ex in examples], IGNORE_INDEX)
        index = [torch.as_tensor(ex[f"{prefix}{s}_parent_index"]) for s in SIDES for ex in examples]
        out[f"{prefix}parent_index"] = _pad(index, -1)
    out["parent_weight"] = _pad([torch.tensor(ex[f"{s}_weight"], dtype=torch.float32) for s in SIDES
                                 for ex in examples], 0.0)
    if all("reference_logps" in ex for ex in examples):  # precomputed log π_ref: 2B, chosen then rejected
        out["reference_logps"] = torch.tensor([ex["reference_logps"][k] for k in (0, 1) for ex in examples],
                                              dtype=torch.float64)
    out["num_sequences"] = len(examples)  # the pairs: the unit of Needs.normalize_by="sequences"
    return out
