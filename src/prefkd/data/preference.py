"""Preference pairs (docs/methods.md §10): (prompt x, chosen y_w, rejected y_l), optionally with per-token/per-parent
weights.

Formats, per JSON record (a local JSONL file or rows of ``datasets.load_dataset``):

- Anthropic HH: ``chosen`` and ``rejected`` are full dialogues; the prompt is everything up to and including the
  last ``"\\n\\nAssistant:"`` of the chosen dialogue, the responses are the remainders. Where the rejected dialogue
  does not share that prefix (4 of the 2,312 HH harmless test pairs, whose responses hold further turns), the
  prompt is cut at the last ``"\\n\\nAssistant:"`` inside the common prefix.
- UltraFeedback / TIS-DPO: ``prompt``, ``chosen``, ``rejected`` (strings), optional ``chosen_weight`` and
  ``rejected_weight`` (lists of numbers: one per parent, or per token for same-tokenizer TIS-DPO), optional
  ``reference_chosen_logps`` and ``reference_rejected_logps`` (precomputed log π_ref, ``python -m
  prefkd.reference_logps``).

``reverse=True`` swaps chosen and rejected, weights included (the data of the reverse-DPO teacher π⁻).
A pair whose responses are empty or equal is an error that names the file and line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from prefkd.data.records import DataError, check_messages, check_unicode, read_jsonl

HH_SEP = "\n\nAssistant:"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferencePair:
    """One pair. ``chosen_weight`` / ``rejected_weight``: per-parent (or per-token) weights, or None."""

    prompt: str | list[dict]  # text, or a conversation ([{role, content}, ...]) each model renders (prefkd.data.chat)
    chosen: str
    rejected: str
    chosen_weight: tuple[float, ...] | None = None
    rejected_weight: tuple[float, ...] | None = None
    reference_logps: tuple[float, float] | None = None  # (chosen, rejected) log π_ref, precomputed

    def reversed(self) -> PreferencePair:
        """The same pair with chosen and rejected (and their weights and reference log-probs) swapped."""
        ref = None if self.reference_logps is None else self.reference_logps[::-1]
        return replace(self, chosen=self.rejected, rejected=self.chosen, chosen_weight=self.rejected_weight,
                       rejected_weight=self.chosen_weight, reference_logps=ref)


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(prompt: str, where: str = "pair") -> list[dict]:
    """An HH prompt (``"\n\nHuman: …\n\nAssistant: …\n\nHuman: …\n\nAssistant:"``) as a conversation (Human →
    ``user``, Assistant → ``assistant``, each turn stripped), ending with the user's turn: the history each model then
    renders with its own chat template (:mod:`prefkd.data.chat`)."""
    parts = HH_TURN.split(prompt)  # ["", "Human", " text", "Assistant", " text", ..., "Assistant", ""]
    if parts[0].strip() or len(parts) < 5 or parts[-2] != "Assistant" or parts[-1].strip():
        raise DataError(f"{where}: the prompt is not an HH dialogue (\\n\\nHuman: ... \\n\\nAssistant:), so it cannot "
                        f"become a conversation; set dataset.source.as_messages=false, or give `prompt` as a list of "
                        f"{{role, content}} turns")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(parts[1:-2:2], parts[2:-2:2])]
    check_messages(turns, where)
    return turns


def as_conversation(pair: PreferencePair, where: str = "pair") -> PreferencePair:
    """``pair`` with its HH prompt as a conversation (:func:`hh_messages`) and its responses stripped."""
    if isinstance(pair.prompt, list):
        return pair
    return replace(pair, prompt=hh_messages(pair.prompt, where), chosen=pair.chosen.strip(),
                   rejected=pair.rejected.strip())


def split_hh(chosen: str, rejected: str, where: str = "pair") -> PreferencePair:
    """Split two HH dialogues into (prompt, chosen response, rejected response)."""
    cut = chosen.rfind(HH_SEP)
    if cut < 0:
        raise DataError(f"{where}: the chosen dialogue has no {HH_SEP!r}; HH pairs are full dialogues ending "
                        f"with an assistant turn (or give a `prompt` field).")
    prompt = chosen[:cut + len(HH_SEP)]
    if not rejected.startswith(prompt):
        common = os.path.commonprefix([chosen, rejected])
        cut = common.rfind(HH_SEP)
        if cut < 0:
            raise DataError(f"{where}: chosen and rejected share no prompt ending in {HH_SEP!r}.")
        prompt = common[:cut + len(HH_SEP)]
    return PreferencePair(prompt, chosen[len(prompt):], rejected[len(prompt):])


def _weights(raw: dict, key: str, where: str) -> tuple[float, ...] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
        raise DataError(f"{where}: `{key}` must be a list of numbers (one weight per parent or token), got "
                        f"{type(value).__name__}.")
    return tuple(float(v) for v in value)


def _reference(raw: dict, where: str) -> tuple[float, float] | None:
    keys = ("reference_chosen_logps", "reference_rejected_logps")
    values = [raw.get(k) for k in keys]
    if all(v is None for v in values):
        return None
    if not all(isinstance(v, (int, float)) for v in values):
        raise DataError(f"{where}: {keys[0]} and {keys[1]} must both be numbers (precomputed reference "
                        f"log-probs, from `python -m prefkd.reference_logps`), got {values}.")
    return float(values[0]), float(values[1])


def to_pair(raw: dict, where: str, reverse: bool = False, check: bool = True) -> PreferencePair:
    """One record (HH or prompt/chosen/rejected format) → :class:`PreferencePair`; ``where`` names it in errors."""
    for key in ("chosen", "rejected"):
        if not isinstance(raw.get(key), str):
            raise DataError(f"{where}: field `{key}` is missing or not a string; a preference record needs "
                            f"`chosen` and `rejected` (and `prompt`, unless they are full HH dialogues).")
    for key in ("chosen", "rejected") + (("prompt",) if isinstance(raw.get("prompt"), str) else ()):
        check_unicode(raw.get(key), key, where)
    if isinstance(raw.get("prompt"), list):  # a conversation: each model renders it with its chat template
        check_messages(raw["prompt"], f"{where} (prompt)")
        pair = PreferencePair([dict(t) for t in raw["prompt"]], raw["chosen"].strip(), raw["rejected"].strip())
    elif raw.get("prompt") is not None:
        if not isinstance(raw["prompt"], str):
            raise DataError(f"{where}: field `prompt` must be a string, or a conversation (a list of "
                            f"{{role, content}} turns ending with the user's).")
        pair = PreferencePair(raw["prompt"], raw["chosen"], raw["rejected"])
    else:
        pair = split_hh(raw["chosen"], raw["rejected"], where)
    pair = replace(pair, chosen_weight=_weights(raw, "chosen_weight", where),
                   rejected_weight=_weights(raw, "rejected_weight", where), reference_logps=_reference(raw, where))
    if check:
        if not pair.chosen.strip() or not pair.rejected.strip():
            side = "chosen" if not pair.chosen.strip() else "rejected"
            raise DataError(f"{where}: the {side} response is empty; drop the pair or fix the record.")
        if pair.chosen == pair.rejected:
            raise DataError(f"{where}: chosen and rejected responses are identical (no preference to learn); "
                            f"drop the pair.")
    return pair.reversed() if reverse else pair


def to_pairs(rows: Iterable[dict], source: str, reverse: bool = False, check: bool = True,
             limit: int | None = None, skip_invalid: bool = False) -> list[PreferencePair]:
    """Records → pairs (the first ``limit``); errors name ``source`` and the 1-based record number.
    ``skip_invalid``: drop pairs with empty or equal responses (logged with their count) instead of failing."""
    pairs, skipped = [], []
    for i, raw in enumerate(rows):
        if limit is not None and i >= limit:
            break
        try:
            pairs.append(to_pair(dict(raw), f"{source} record {i + 1}", reverse, check))
        except DataError as e:
            if "response" not in str(e):
                raise
            if not skip_invalid:
                raise DataError(f"{e} (or set skip_invalid=true to drop such pairs)") from e
            skipped.append(i + 1)
    if skipped:
        log.warning("%s: dropped %d pairs with empty or equal responses (records %s)", source, len(skipped),
                    ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else ""))
    return pairs


def load_pairs(path: str | Path, limit: int | None = None, reverse: bool = False, check: bool = True,
               skip_invalid: bool = False) -> list[PreferencePair]:
    """Pairs from a local JSONL file (HH or prompt/chosen/rejected records); the first ``limit``."""
    rows = read_jsonl(path, required=("chosen", "rejected"))
    return to_pairs(rows, str(path), reverse, check, limit, skip_invalid)


def load_hub_pairs(path: str, split: str = "train", name: str | None = None, reverse: bool = False,
                   limit: int | None = None, skip_invalid: bool = False, **kwargs) -> list[PreferencePair]:
    """Pairs from ``datasets.load_dataset(path, name, split=split)`` (a hub id such as ``Anthropic/hh-rlhf`` or a
    local folder)."""
    import datasets

    try:
        rows = datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as e:
        raise DataError(f"could not load preference data {path!r} (split {split!r}): {e}. Offline, give a local "
                        f"JSONL file instead (prompt/chosen/rejected or HH chosen/rejected records).") from e
    return to_pairs(rows, f"{path}[{split}]", reverse, limit=limit, skip_invalid=skip_invalid)


def pairs_as_records(pairs: Sequence[PreferencePair]) -> list[dict]:
    """Plain dicts (for caching and for the trainer's datasets)."""
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
             **({"chosen_weight": list(p.chosen_weight)} if p.chosen_weight is not None else {}),
             **({"rejected_weight": list(p.rejected_weight)} if p.rejected_weight is not None else {}),
             **({"reference_chosen_logps": p.reference_logps[0], "reference_rejected_logps": p.reference_logps[1]}
                if p.reference_logps is not None else {})}
            for p in pairs]


def read_pairs(source: str, limit: int | None = None, reverse: bool = False, skip_invalid: bool = False,
               split: str = "train") -> list[PreferencePair]:
    """Pairs from ``source``: a local JSONL file when that path exists or names one (a ``.jsonl`` path: missing, its
    error says how to get it), else ``datasets.load_dataset(source, split=split)`` (a hub id such as
    ``Anthropic/hh-rlhf``, or a datasets folder). The first ``limit`` pairs."""
    path = Path(source).expanduser()
    if path.exists() or path.suffix == ".jsonl":
        return load_pairs(path, limit, reverse, skip_invalid=skip_invalid)
    return load_hub_pairs(source, split=split, reverse=reverse, limit=limit, skip_invalid=skip_invalid)


def preference_splits(train: str, dev: str | None = None, test: str | None = None, dev_size: int = 0,
                      seed: int = 0, reverse: bool = False, limit: int | None = None, skip_invalid: bool = False,
                      split: str = "train", as_sft: bool = False, as_messages: bool = False):
    """A dataset source (Hydra ``_target_``): pairs from a local JSONL file or a hub id (``train``; a path that
    exists locally is read as JSONL, anything else through ``datasets.load_dataset(train, split=split)``).
    Without ``dev``, ``dev_size`` pairs are carved from train (seeded). ``limit``: the first N pairs of train.

    Records: ``{"prompt", "chosen", "rejected"[, weights]}`` (``reverse`` swaps chosen and rejected), or, with
    ``as_sft``, instruction records ``{"prompt", "output": chosen}`` for SFT on the chosen responses. ``as_messages``:
    each HH prompt becomes a conversation (:func:`hh_messages`) that each model renders with its chat template.
    """
    from prefkd.data.sources import carve
    from prefkd.data.splits import DataSplits

    def read(source: str, n: int | None = None) -> list[PreferencePair]:
        pairs = read_pairs(source, n, reverse, skip_invalid, split)
        return [as_conversation(p, f"{source} pair {i + 1}") for i, p in enumerate(pairs)] if as_messages else pairs

    def records(pairs: Sequence[PreferencePair]) -> list[dict]:
        if as_sft:
            return [{"messages" if isinstance(p.prompt, list) else "prompt": p.prompt, "output": p.chosen}
                    for p in pairs]
        return pairs_as_records(pairs)

    train_records = records(read(train, limit))
    dev_records = records(read(dev)) if dev else []
    if not dev:
        train_records, dev_records = carve(train_records, dev_size, seed)
    test_records = records(read(test)) if test else []
    name = Path(train).name + (":reversed" if reverse else "")
    return DataSplits(train=train_records, dev=dev_records, test=test_records, source=f"pairs({name})")
