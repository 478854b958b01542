"""The training dataset: records → both models' token ids (+ precomputed per-example fields), cached on
disk, and the collator that pads them dynamically.

Each record's ``prompt`` and ``output`` are tokenised by the student's tokenizer (``input_ids``,
``labels``) and, when a teacher tokenizer is given, by the teacher's (``teacher_input_ids``,
``teacher_labels``), following :mod:`prefkd.data.tokenize`. A loss's ``precompute`` hook (cross-tokenizer
alignments, docs/methods.md §1) adds fields per example. The result is cached under a key covering everything it
depends on; a second construction with the same inputs loads it instead of recomputing.

Batches (:func:`collate`) are right-padded to the longest sequence of the batch, never to a fixed length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from prefkd.data.chat import check_verbatim, end_of_turn_id, render_prompt
from prefkd.data.records import to_instruction_record
from prefkd.data.tokenize import TokenizedExample, build_example, encode, ensure_pad_token
from prefkd.utils.cache import cache_root, tokenizer_fingerprint
from prefkd.utils.io import atomic_file
from prefkd.utils.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

CACHE_FORMAT = "prefkd-distill-dataset-2"  # bump when the cached layout or the tokenisation rules change
RESERVED = ("input_ids", "labels", "attention_mask", "teacher_input_ids", "teacher_labels",
            "teacher_attention_mask")
_CHUNK = 512  # records tokenised per batched tokenizer call
_PROGRESS_FROM = 1000  # show a progress bar from this many records


# ---------------------------------------------------------------------------------------------- cache key
def default_cache_dir() -> Path:
    """``$PREFKD_CACHE/data``, else ``~/.cache/prefkd/data``."""
    return cache_root() / "data"


def hook_name(hook: Callable | None) -> str:
    """``module.qualname`` of a precompute hook (bound methods, functions, callable objects); "" for None."""
    if hook is None:
        return ""
    target = getattr(hook, "func", hook)  # functools.partial
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{getattr(target, '__module__', '')}.{qualname}"


def cache_key(records: Sequence[dict], student_tokenizer, teacher_tokenizer, max_prompt_length: int,
              max_length: int, precompute: Callable | None, precompute_version: str) -> str:
    """sha256 over the records' content (in order), both tokenizers' fingerprints, the length budgets, the
    precompute hook's qualified name and version, and :data:`CACHE_FORMAT`."""
    h = hashlib.sha256()
    head = [CACHE_FORMAT, tokenizer_fingerprint(student_tokenizer),
            tokenizer_fingerprint(teacher_tokenizer) if teacher_tokenizer is not None else None,
            int(max_prompt_length), int(max_length), hook_name(precompute),
            str(precompute_version) if precompute is not None else None, len(records)]
    h.update(json.dumps(head).encode())
    for record in records:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _pack(examples: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Examples → per field one flat tensor + an N×ndim shape table (fast to save and load; int64 values
    that fit are stored as int32)."""
    if not examples:
        return {}
    keys = list(examples[0])
    for i, ex in enumerate(examples):
        if set(ex) != set(keys):
            raise ValueError(f"example {i} has fields {sorted(ex)}, example 0 has {sorted(keys)}: a precompute "
                             f"hook must return the same fields for every example.")
    packed = {}
    for key in keys:
        tensors = [ex[key] for ex in examples]
        ndim = max(t.dim() for t in tensors)
        tensors = [t.reshape((0,) * ndim) if t.dim() != ndim and t.numel() == 0 else t for t in tensors]
        if any(t.dim() != ndim for t in tensors):
            raise ValueError(f"field {key!r} has different ranks across examples; keep one rank per field.")
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dtype = str(flat.dtype).removeprefix("torch.")
        if flat.dtype == torch.int64 and (flat.numel() == 0 or (flat.min() >= -2**31 and flat.max() < 2**31)):
            flat = flat.to(torch.int32)
        packed[key] = {"flat": flat, "shapes": torch.tensor([list(t.shape) for t in tensors], dtype=torch.long)
                       .reshape(len(tensors), ndim), "dtype": dtype}
    return packed


def _unpack(packed: dict[str, dict], n: int) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`_pack`: per example a dict of views into the flat tensors."""
    examples: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, field in packed.items():
        flat = field["flat"].to(getattr(torch, field["dtype"]))
        shapes = field["shapes"].tolist()
        numels = [math.prod(shape) for shape in shapes]
        for ex, part, shape in zip(examples, torch.split(flat, numels), shapes):
            ex[key] = part.view(shape)
    return examples


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace (readers never see half a file)."""
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


# ---------------------------------------------------------------------------------------------- padding
BUILTIN_PADS = {"labels": IGNORE_INDEX, "teacher_labels": IGNORE_INDEX}  # and the pad ids for the *input_ids


def pad_value(key: str, declared: Mapping[str, float] | None = None) -> float:
    """The padding value of a field: the labels' -100, else what the precompute hook declares for it
    (``hook.pad_values = {field: value}``), else 0."""
    if key in BUILTIN_PADS:
        return BUILTIN_PADS[key]
    return (declared or {}).get(key, 0)


def pad_stack(values: Sequence, value: float) -> torch.Tensor:
    """Stack tensors of equal rank (B×...) padded at the end of every dim to the largest size with ``value``.
    Lists become tensors first; an empty tensor of lower rank counts as empty at the common rank."""
    tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
    ndim = max(t.dim() for t in tensors)
    tensors = [t.reshape((0,) * ndim) if t.dim() != ndim and t.numel() == 0 else t for t in tensors]
    if any(t.dim() != ndim for t in tensors):
        raise ValueError(f"cannot batch tensors of different ranks {[tuple(t.shape) for t in tensors]}")
    if ndim == 0:
        return torch.stack(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(ndim)]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    out = torch.full((len(tensors), *shape), value, dtype=dtype)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, s) for s in t.shape))] = t
    return out


def _to_tensor(value: Any, pad: float = 0) -> torch.Tensor:
    """A precompute value as a tensor: scalars 0-d, lists 1-D, lists of lists 2-D (ragged rows padded with ``pad``)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "__array__") and not isinstance(value, (list, tuple)):
        return torch.as_tensor(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, torch.Tensor)):
        return pad_stack([_to_tensor(v, pad) for v in value], pad)
    t = torch.tensor(value)
    return t.long() if t.numel() == 0 else t


# ---------------------------------------------------------------------------------------------- dataset
PrecomputeHook = Callable[[dict, TokenizedExample, "TokenizedExample | None", Any, Any], dict]


class DistillDataset(Dataset):
    """Tokenised instruction records for a student (and a teacher), with optional precomputed fields.

    ``dataset[i]`` is a dict of 1-D long tensors ``input_ids`` (n), ``labels`` (n) and, with a teacher,
    ``teacher_input_ids`` (m), ``teacher_labels`` (m), plus the fields of ``precompute``. The strings stay
    in ``dataset.records[i]`` (``prompt``, ``output``, ...). A chat record (``messages``, :mod:`prefkd.data.chat`)
    gets each side's prompt rendered by its tokenizer's template (``prompt``: the student's, ``teacher_prompt``: the
    teacher's), keeps the end of its history when cut, and ends its answer with the template's end of turn
    (:meth:`end_id`). A record whose ``output`` is a list of
    references is trained on its first reference; one with ``"truncated": true`` (an answer cut by a token budget,
    as ``python -m prefkd.generate`` marks them) gets no EOS label.

    ``precompute(record, student, teacher, student_tokenizer, teacher_tokenizer) -> dict`` gets the two
    :class:`~prefkd.data.tokenize.TokenizedExample` s (``teacher`` is None without a teacher tokenizer;
    ``.input_ids``, ``.labels``, ``.full_ids``, ``.prompt_length``, ``.response_ids``) and returns extra
    fields (tensors, lists or lists of lists). The hook declares how they pad (``hook.pad_values = {field:
    value}``, 0 when not declared); :meth:`collate` pads them so.

    Cache: ``cache_dir`` (default :func:`default_cache_dir`) / ``<key>.pt`` with the key of
    :func:`cache_key`; ``use_cache=False`` neither reads nor writes it. ``from_cache`` says whether this
    instance was loaded from it. ``stats`` counts truncated prompts and sequences per side.
    """

    def __init__(self, records: Sequence[dict], student_tokenizer, teacher_tokenizer=None,
                 max_prompt_length: int = 256, max_length: int = 512, precompute: PrecomputeHook | None = None,
                 precompute_version: str = "1", cache_dir: str | os.PathLike | None = None, source: str = "",
                 use_cache: bool = True):
        self.source = source or "records"
        self.student_tokenizer = ensure_pad_token(student_tokenizer)
        self.teacher_tokenizer = ensure_pad_token(teacher_tokenizer) if teacher_tokenizer is not None else None
        self.records = [self._render(to_instruction_record(r, f"{self.source} record {i}"), f"{self.source} record {i}")
                        for i, r in enumerate(records)]
        self.chat = any("messages" in r for r in self.records)
        # the token that ends an answer, per side: the template's end of turn for chat records (prefkd.data.chat)
        self.end_ids = {side: end_of_turn_id(tok) if self.chat else tok.eos_token_id
                        for side, tok in (("student", self.student_tokenizer), ("teacher", self.teacher_tokenizer))
                        if tok is not None}
        self.max_prompt_length, self.max_length = max_prompt_length, max_length
        self.precompute, self.precompute_version = precompute, str(precompute_version)
        self.pad_values = dict(getattr(precompute, "pad_values", None) or {})  # the hook's fields' padding values
        self.key = cache_key(self.records, self.student_tokenizer, self.teacher_tokenizer, max_prompt_length,
                             max_length, precompute, self.precompute_version)
        # the token ids alone, without the precompute hook's fields: what a teacher cache depends on (any loss)
        self.token_key = cache_key(self.records, self.student_tokenizer, self.teacher_tokenizer, max_prompt_length,
                                   max_length, None, "")
        self.cache_path = Path(cache_dir or default_cache_dir()).expanduser() / f"{self.key}.pt" if use_cache else None
        self.from_cache = False
        data = self._load_cache()
        if data is None:
            data = self._build()
            if self.cache_path is not None:
                _atomic_save(data, self.cache_path)
        self.examples: list[dict[str, torch.Tensor]] = _unpack(data["fields"], data["n"])
        self.stats: dict[str, int] = data["stats"]
        self._warn_truncation()

    # ------------------------------------------------------------------ building
    def _render(self, record: dict, where: str) -> dict:
        """A chat record with each side's prompt rendered by its own template (``prompt``: the student's,
        ``teacher_prompt``: the teacher's), the answer checked to be written verbatim by both; other records as
        they are."""
        if "messages" not in record:
            return record
        output = record["output"][0] if isinstance(record["output"], list) else record["output"]
        rendered = dict(record)
        for key, tokenizer in (("prompt", self.student_tokenizer), ("teacher_prompt", self.teacher_tokenizer)):
            if tokenizer is not None:
                rendered[key] = render_prompt(record["messages"], tokenizer, where)
                check_verbatim(record["messages"], output, tokenizer, rendered[key], where)
        return rendered

    def end_id(self, record: dict, side: str) -> int:
        """The token appended after ``record``'s answer on ``side`` (``student`` / ``teacher``): the template's end of
        turn for a chat record, else EOS."""
        tokenizer = self.student_tokenizer if side == "student" else self.teacher_tokenizer
        return self.end_ids[side] if "messages" in record else tokenizer.eos_token_id

    def _load_cache(self) -> dict | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        try:
            data = torch.load(self.cache_path, weights_only=True)
            if data.get("key") != self.key or data.get("n") != len(self.records):
                raise ValueError("key or size mismatch")
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable data cache %s (%s); rebuilding it", self.cache_path, e)
            return None
        self.from_cache = True
        return data

    def _build(self) -> dict:
        stats = {"n": len(self.records), "prompt_truncated": 0, "sequence_truncated": 0,
                 "teacher_prompt_truncated": 0, "teacher_sequence_truncated": 0}
        examples = []
        bar = tqdm(total=len(self.records), desc=f"tokenising {self.source}", unit="ex",
                   disable=len(self.records) < _PROGRESS_FROM)
        for start in range(0, len(self.records), _CHUNK):
            chunk = self.records[start:start + _CHUNK]
            student = self._tokenize(chunk, start, "student")
            teacher = self._tokenize(chunk, start, "teacher") if self.teacher_tokenizer else None
            for k, record in enumerate(chunk):
                s, t = student[k], teacher[k] if teacher else None
                stats["prompt_truncated"] += s.prompt_truncated
                stats["sequence_truncated"] += s.sequence_truncated
                if t is not None:
                    stats["teacher_prompt_truncated"] += t.prompt_truncated
                    stats["teacher_sequence_truncated"] += t.sequence_truncated
                examples.append(self.make_example(record, s, t, f"{self.source} record {start + k}"))
            bar.update(len(chunk))
        bar.close()
        return {"key": self.key, "format": CACHE_FORMAT, "source": self.source, "n": len(examples),
                "fields": _pack(examples), "stats": stats}

    def _tokenize(self, chunk: list[dict], start: int, side: str) -> list[TokenizedExample]:
        """Each record of ``chunk`` tokenised for ``side`` (``student`` / ``teacher``): its prompt (a chat record's
        rendered by that side's template), its answer, and the end token."""
        tokenizer = self.student_tokenizer if side == "student" else self.teacher_tokenizer
        key = "teacher_prompt" if side == "teacher" else "prompt"
        outputs = [r["output"][0] if isinstance(r["output"], list) else r["output"] for r in chunk]
        prompt_ids = encode(tokenizer, [r.get(key, r["prompt"]) for r in chunk])
        response_ids = encode(tokenizer, outputs, split_special_tokens=True)  # "</s>" in an answer is text
        # a record marked `truncated` (an answer cut by a token budget: python -m prefkd.generate) learns no EOS
        return [build_example(p, o, self.end_id(record, side), self.max_prompt_length, self.max_length,
                              where=f"{self.source} record {start + k}", ended=not record.get("truncated", False),
                              keep_prompt_end="messages" in record)  # a conversation keeps its latest turns
                for k, (p, o, record) in enumerate(zip(prompt_ids, response_ids, chunk))]

    def make_example(self, record: dict, student: TokenizedExample, teacher: TokenizedExample | None,
                     where: str) -> dict[str, torch.Tensor]:
        """One example's fields from its two tokenisations: the token ids, the labels and the precompute hook's
        fields. The dataset builds its examples so, and on-policy training its sampled ones
        (:mod:`prefkd.training.on_policy`), so that both pass through the same hook."""
        example = {"input_ids": torch.tensor(student.input_ids), "labels": torch.tensor(student.labels)}
        if teacher is not None:
            example["teacher_input_ids"] = torch.tensor(teacher.input_ids)
            example["teacher_labels"] = torch.tensor(teacher.labels)
        if self.precompute is not None:
            example.update(self._run_precompute(record, student, teacher, where))
        return example

    def _run_precompute(self, record, student, teacher, where: str) -> dict[str, torch.Tensor]:
        extra = self.precompute(record, student, teacher, self.student_tokenizer, self.teacher_tokenizer)
        if not isinstance(extra, dict):
            raise TypeError(f"precompute hook {hook_name(self.precompute)} returned {type(extra).__name__} for "
                            f"{where}; it must return a dict of fields.")
        clash = sorted(set(extra) & set(RESERVED))
        if clash:
            raise ValueError(f"precompute hook {hook_name(self.precompute)} returned reserved field(s) {clash}; "
                             f"rename them (reserved: {', '.join(RESERVED)}).")
        return {key: _to_tensor(value, pad_value(key, self.pad_values)) for key, value in extra.items()}

    def _warn_truncation(self) -> None:
        s = self.stats
        parts = []
        for side, prefix in (("student", ""), ("teacher", "teacher_")):
            n_p, n_s = s.get(f"{prefix}prompt_truncated", 0), s.get(f"{prefix}sequence_truncated", 0)
            if n_p or n_s:
                parts.append(f"{side}: {n_p} prompts cut to {self.max_prompt_length} tokens, "
                             f"{n_s} sequences cut to {self.max_length} tokens")
        if parts:
            log.warning("%s (%d examples) truncated — %s.", self.source, s["n"], "; ".join(parts))

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]

    def collate(self, examples: Sequence[dict], student_pad_id: int | None,
                teacher_pad_id: int | None = None) -> dict[str, torch.Tensor]:
        """:func:`collate` with this dataset's precompute hook's padding values."""
        return collate(examples, student_pad_id, teacher_pad_id, self.pad_values)

    @property
    def lengths(self) -> list[int]:
        """Student sequence length (``len(input_ids)``) per example, for length grouping."""
        return [int(ex["input_ids"].numel()) for ex in self.examples]

    @property
    def teacher_lengths(self) -> list[int]:
        """Teacher sequence length per example (empty without a teacher)."""
        return [int(ex["teacher_input_ids"].numel()) for ex in self.examples if "teacher_input_ids" in ex]


# ---------------------------------------------------------------------------------------------- batching
def collate(examples: Sequence[dict], student_pad_id: int | None, teacher_pad_id: int | None = None,
            pad_values: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest of the batch.

    Returns B×n ``input_ids`` (pad id), ``attention_mask`` (1 on tokens), ``labels`` (-100 on padding);
    with teacher fields B×m ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``; every
    other field stacked and padded on all dims with :func:`pad_value` (``pad_values``: the precompute hook's; a
    precompute field without ``pad_values`` is an error, so that no index pads with a valid position by mistake).
    """
    if not examples:
        raise ValueError("collate got an empty list of examples")
    keys = list(examples[0])
    for ex in examples[1:]:
        if list(ex) != keys and set(ex) != set(keys):
            raise ValueError(f"examples of one batch have different fields: {sorted(keys)} vs {sorted(ex)}")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [ex[key] for ex in examples]
        if key in ("input_ids", "teacher_input_ids"):
            pad_id = student_pad_id if key == "input_ids" else teacher_pad_id
            if pad_id is None:
                side = "student" if key == "input_ids" else "teacher"
                raise ValueError(f"collate needs the {side} pad id to pad {key!r} (tokenizer.pad_token_id; "
                                 f"prefkd.data.tokenize.ensure_pad_token sets pad := eos).")
            out[key] = pad_stack(values, pad_id)
            mask = pad_stack([torch.ones(len(v), dtype=torch.long) for v in values], 0)
            out["attention_mask" if key == "input_ids" else "teacher_attention_mask"] = mask
        elif key not in ("attention_mask", "teacher_attention_mask"):
            if pad_values is None and key not in BUILTIN_PADS:
                raise ValueError(f"collate: field {key!r} comes from a precompute hook, which declares its padding "
                                 f"value; batch with the dataset's own dataset.collate(...) or pass pad_values")
            out[key] = pad_stack(values, pad_value(key, pad_values))
    return out

