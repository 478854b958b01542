"""MinED's vocabulary map teacher → student (docs/methods.md §6), built once per tokenizer pair and cached on disk.

For every teacher token string x (all ids of ``get_vocab()``, added and special tokens included, byte
tokens such as ``<0x0A>`` as they are): x' = x with the teacher's word-start marker replaced by the
student's (:func:`prefkd.align.markers.word_start_marker`, every occurrence). If x' is a student token
string, the teacher id maps to that student id; otherwise to the student token at the smallest Levenshtein
distance (unit costs, on Unicode code points), ties going to the lowest student id:

    t2s[t] = argmin_{s = 0 .. V_s − 1} lev(x'_t, y_s)      (first minimum = lowest id)

This is FuseLLM's construction, and it reproduces the published maps (``$PREFKD_SHARED/data/vocab_alignment/``):
special tokens get no special treatment (Qwen's ``<|im_start|>`` maps to GPT-2's nearest string), exact matches
include ``<|endoftext|>`` and byte tokens. The distances come from ``rapidfuzz.process.cdist`` in chunks of teacher
strings × all student strings (uint8, both cores), and ``numpy.argmin`` returns the first minimum, i.e. the lowest
student id.

Files (:func:`save_vocab_map`) are JSON objects ``{"teacher_id": student_id}`` in teacher-id order, like
the published ones. :func:`load_or_build_vocab_map` caches them under
``$PREFKD_CACHE/vocab_maps/<sha256 of both tokenizers' fingerprints and ALGORITHM>.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from prefkd.align.markers import vocab_strings, word_start_marker
from prefkd.utils.io import atomic_write

log = logging.getLogger(__name__)

ALGORITHM = "mined-vocab-map-1"  # bump when the construction changes (part of the cache key)
CHUNK = 2048  # teacher strings per cdist call: CHUNK × V_s bytes of distances (≈ 100 MB for GPT-2)


def _rapidfuzz():
    try:
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein
    except ImportError as err:  # an optional extra: say how to get it
        raise ImportError("prefkd.align needs rapidfuzz for edit distances: pip install 'prefkd[align]' "
                          "(or pip install rapidfuzz).") from err
    return process, Levenshtein


def map_strings(teacher: Sequence[str], student: Sequence[str], chunk: int = CHUNK, workers: int = -1) -> list[int]:
    """For each teacher string, the index of the equal student string (lowest index if several), else of
    the student string at the smallest Levenshtein distance (lowest index among ties). Strings are taken
    as they are (replace markers first). Returns a list of len(teacher) student indices."""
    if not student:
        raise ValueError("the student vocabulary is empty")
    process, Levenshtein = _rapidfuzz()
    exact: dict[str, int] = {}
    for j, s in enumerate(student):
        exact.setdefault(s, j)
    out = [exact.get(t, -1) for t in teacher]
    todo = [k for k, j in enumerate(out) if j < 0]
    for start in range(0, len(todo), chunk):
        rows = todo[start:start + chunk]
        # Distances above 254 saturate at 255 (uint8); token strings are far shorter than that.
        dist = process.cdist([teacher[k] for k in rows], student, scorer=Levenshtein.distance,
                             dtype=np.uint8, score_cutoff=254, workers=workers)
        for k, j in zip(rows, dist.argmin(axis=1).tolist()):  # argmin: first minimum = lowest student id
            out[k] = j
    return out


def build_vocab_map(teacher_tok, student_tok, teacher_ids: Iterable[int] | None = None,
                    chunk: int = CHUNK, workers: int = -1) -> dict[int, int]:
    """The map ``{teacher_id: student_id}`` of the module docstring, for every teacher id of the teacher's
    vocabulary (or only ``teacher_ids``, e.g. a sample for a quick comparison: same code path)."""
    t_marker, s_marker = word_start_marker(teacher_tok), word_start_marker(student_tok)
    t_vocab, s_vocab = vocab_strings(teacher_tok), vocab_strings(student_tok)
    ids = [i for i, t in enumerate(t_vocab) if t is not None] if teacher_ids is None else \
        sorted({int(i) for i in teacher_ids if 0 <= int(i) < len(t_vocab) and t_vocab[int(i)] is not None})
    s_ids = [j for j, s in enumerate(s_vocab) if s is not None]  # ascending: index order = id order
    queries = [t_vocab[i].replace(t_marker, s_marker) if t_marker else t_vocab[i] for i in ids]
    best = map_strings(queries, [s_vocab[j] for j in s_ids], chunk=chunk, workers=workers)
    return {i: s_ids[b] for i, b in zip(ids, best)}


def invert_map(t2s: Mapping[int, int]) -> dict[int, int]:
    """Student → teacher, keeping for each student id the LOWEST teacher id that maps to it (the first in
    teacher-id order, as DSKD's inversion of the published maps does)."""
    s2t: dict[int, int] = {}
    for t in sorted(t2s):
        s2t.setdefault(int(t2s[t]), int(t))
    return s2t


def map_to_tensor(mapping: Mapping[int, int], size: int | None = None) -> torch.Tensor:
    """A map as a LongTensor ``ids`` of length ``size`` (default max key + 1): ``ids[k] = mapping[k]``, -1
    where k is unmapped. Keys ≥ size are dropped (e.g. a model vocabulary smaller than the tokenizer's)."""
    size = (max(mapping) + 1 if mapping else 0) if size is None else int(size)
    ids = torch.full((size,), -1, dtype=torch.long)
    keys = torch.tensor([k for k in mapping if 0 <= k < size], dtype=torch.long)
    if keys.numel():
        ids[keys] = torch.tensor([mapping[int(k)] for k in keys.tolist()], dtype=torch.long)
    return ids


# ---------------------------------------------------------------------------------------------- files
def save_vocab_map(mapping: Mapping[int, int], path: str | os.PathLike) -> Path:
    """Write ``{"teacher_id": student_id}`` (teacher-id order, indent 2, like the published files)
    atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path).expanduser()
    atomic_write(path, json.dumps({str(k): int(mapping[k]) for k in sorted(mapping)}, indent=2))
    return path


def load_vocab_map(path: str | os.PathLike) -> dict[int, int]:
    """Read a map file (ours or a published one) as ``{teacher_id: student_id}`` with int keys."""
    with open(path) as f:
        return {int(k): int(v) for k, v in json.load(f).items()}


def vocab_map_cache_path(teacher_tok, student_tok, cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` (default ``$PREFKD_CACHE/vocab_maps``) / sha256(ALGORITHM, teacher and student
    tokenizer fingerprints) ``.json``."""
    from prefkd.utils.cache import cache_root, tokenizer_fingerprint

    key = hashlib.sha256("\n".join([ALGORITHM, tokenizer_fingerprint(teacher_tok),
                                    tokenizer_fingerprint(student_tok)]).encode()).hexdigest()[:32]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "vocab_maps"
    return folder / f"{key}.json"


def load_or_build_vocab_map(teacher_tok, student_tok, cache_dir: str | os.PathLike | None = None,
                            rebuild: bool = False) -> dict[int, int]:
    """The cached map of this tokenizer pair, built (and cached) if missing, unreadable or ``rebuild``."""
    path = vocab_map_cache_path(teacher_tok, student_tok, cache_dir)
    if path.is_file() and not rebuild:
        try:
            return load_vocab_map(path)
        except (OSError, ValueError) as err:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable vocabulary map %s (%s); rebuilding it", path, err)
    log.info("building the MinED vocabulary map teacher → student (%s)", path.name)
    mapping = build_vocab_map(teacher_tok, student_tok)
    save_vocab_map(mapping, path)
    return mapping
