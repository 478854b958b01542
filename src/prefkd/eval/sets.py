"""Evaluation sets: named instruction sets of ``$PREFKD_SHARED/data/instruct`` or any local JSONL.

A set file holds one JSON object per line with ``prompt`` (or ``instruction``/``input``, templated as in
docs/methods.md §1) and ``output``: a reference string or a list of references (S-NI). Reading and validation are
those of :func:`prefkd.data.records.read_jsonl`; a missing field or an empty reference is a
:class:`~prefkd.data.records.DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prefkd.data.records import DataError, read_jsonl

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class EvalExample:
    """One evaluation prompt and its reference answers (at least one, none empty)."""

    prompt: str
    references: tuple[str, ...]


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as given when it exists (relative to the working directory), else relative to the repository
    root (so paths relative to a clone work from any of its directories). Returns the first candidate
    when neither exists, so that the caller's error names the path as written."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    in_repo = REPO / p
    return in_repo if in_repo.exists() else p


def load_eval_set(path: str | Path, limit: int | None = None) -> list[EvalExample]:
    """Read a set file; ``limit`` keeps the first N examples (the whole file is still validated)."""
    records = read_jsonl(resolve_data_path(path))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be a positive number of examples (or null for all).")
        records = records[:limit]
    out = []
    for r in records:
        refs = r["output"] if isinstance(r["output"], list) else [r["output"]]
        out.append(EvalExample(prompt=r["prompt"], references=tuple(refs)))
    return out


def select_sets(names: Sequence[str], known: Mapping[str, str]) -> dict[str, str]:
    """Map the requested set names to files: a key of ``known`` (``dolly`` -> its path) or a path to a local
    ``.jsonl`` (named by its file stem). Unknown names are an error listing the choices."""
    chosen: dict[str, str] = {}
    for name in map(str, names):
        if name in known:
            if not known[name]:
                raise DataError(f"evaluation set {name!r} has no file configured: set eval.sets.{name}=PATH.")
            chosen[name] = str(known[name])
        elif name.endswith(".jsonl") or Path(name).expanduser().is_file():
            chosen[Path(name).stem] = name
        else:
            raise DataError(f"unknown evaluation set {name!r}: use one of {sorted(known)} or the path of a local "
                            f"JSONL file with `prompt` (or `instruction`/`input`) and `output` per line.")
    return chosen
