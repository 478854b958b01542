"""Dataset factories (Hydra ``_target_`` s of ``config/dataset/*.yaml``), each returning :class:`DataSplits`.

- :func:`jsonl_splits`: local JSONL files (``prompt``/``output`` or ``instruction``/``input``/``output``); train
  may be a list of files, concatenated.
- :func:`hub_splits`: anything ``datasets.load_dataset`` reads (a hub id, a local folder, or a builder such
  as ``"json"`` with ``data_files``), with configurable field names.
- :func:`dolly_splits`: databricks-dolly-15k as processed for MiniLLM/DSKD, from a local folder of JSONL
  files or from the hub; :func:`dolly_rows_splits` is its processing of the hub's rows (also used by
  ``python -m prefkd.data fetch dolly``).

Carve-outs (a dev split taken from train) are deterministic: a permutation from ``random.Random(seed)``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefkd.data.records import DataError, read_jsonl, to_instruction_record
from prefkd.data.splits import DataSplits

DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
LOCAL_HINT = ("use local JSONL files instead: `dataset=jsonl dataset.source.train=/path/train.jsonl "
              "dataset.source.dev=/path/dev.jsonl` (one JSON object per line with `prompt` and `output`, or "
              "`instruction`/`input`/`output`)")


def carve(records: Sequence[dict], size: int, seed: int = 0, what: str = "dev") -> tuple[list[dict], list[dict]]:
    """Split ``records`` into (rest, carved): ``size`` records picked by a seeded permutation; the rest keep
    their order."""
    if size <= 0:
        return list(records), []
    if size >= len(records):
        raise DataError(f"cannot carve {size} {what} examples out of {len(records)} training examples; "
                        f"lower the {what} size or give a {what} file.")
    picked = set(random.Random(seed).sample(range(len(records)), size))
    rest = [r for i, r in enumerate(records) if i not in picked]
    carved = [records[i] for i in sorted(picked)]
    return rest, carved


def jsonl_splits(train: str | Sequence[str], dev: str | None = None, test: str | None = None, dev_size: int = 0,
                 seed: int = 0) -> DataSplits:
    """Local JSONL files. ``train`` is one path or a list of paths whose records are concatenated in order (e.g.
    a teacher's generations from ``python -m prefkd.generate`` plus the original answers). Without a ``dev`` file
    and with ``dev_size > 0``, a dev split of ``dev_size`` records is carved deterministically (``seed``) from
    train (all of it, when several files)."""
    paths = [train] if isinstance(train, (str, os.PathLike)) else list(train)
    if not paths:
        raise DataError("dataset.source.train is an empty list; give a JSONL path or a list of them, e.g. "
                        "`dataset.source.train=[gen.jsonl,orig.jsonl]`.")
    records = [record for path in paths for record in read_jsonl(path)]
    dev_records = read_jsonl(dev) if dev else []
    if not dev:
        records, dev_records = carve(records, dev_size, seed)
    test_records = read_jsonl(test) if test else []
    source = f"jsonl({'+'.join(Path(path).name for path in paths)})"
    return DataSplits(train=records, dev=dev_records, test=test_records, source=source)


# ---------------------------------------------------------------------------------------------- hub
def _load(path: str, name: str | None, split: str, **kwargs) -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"loading {path!r} needs the `datasets` package (pip install datasets); or "
                        f"{LOCAL_HINT}.") from e
    try:
        return datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as e:
        raise DataError(f"could not load dataset {path!r} (config {name!r}, split {split!r}): "
                        f"{type(e).__name__}: {e}. Offline, or not a hub id / local path the `datasets` library "
                        f"reads? Then {LOCAL_HINT}.") from e


def _map_rows(rows, where: str, prompt_field: str, output_field: str, instruction_field: str,
              input_field: str, limit: int | None = None) -> list[dict]:
    records = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        row = dict(row)
        record = {k: v for k, v in row.items() if k not in (prompt_field, output_field, instruction_field,
                                                             input_field)}
        if prompt_field in row and row[prompt_field] is not None:
            record["prompt"] = row[prompt_field]
        if instruction_field in row:
            record["instruction"] = row[instruction_field]
            record["input"] = row.get(input_field) or ""
        if output_field not in row:
            raise DataError(f"{where} row {i}: no field {output_field!r} (fields: {sorted(row)}); set "
                            f"output_field to the column holding the response.")
        record["output"] = row[output_field]
        records.append(to_instruction_record(record, f"{where} row {i}"))
    return records


def hub_splits(path: str, name: str | None = None, train_split: str = "train", dev_split: str | None = None,
               test_split: str | None = None, dev_size: int = 0, seed: int = 0, prompt_field: str = "prompt",
               output_field: str = "output", instruction_field: str = "instruction", input_field: str = "input",
               data_files: Any = None, revision: str | None = None, max_examples: int | None = None,
               cache_dir: str | None = None) -> DataSplits:
    """Records from ``datasets.load_dataset(path, name, split=..., data_files=..., revision=...)``.

    Each row gives ``prompt`` from ``prompt_field`` or, when that is absent, the Alpaca template of
    ``instruction_field`` / ``input_field``; ``output`` from ``output_field``; other columns are kept.
    Without ``dev_split`` and with ``dev_size > 0`` a dev split is carved from train (``seed``).
    ``max_examples`` caps each split (for smoke tests); ``cache_dir`` is the ``datasets`` cache (default
    ``HF_DATASETS_CACHE``). A failed load raises :class:`DataError` saying how
    to use local JSONL files instead.
    """
    kwargs = {k: v for k, v in (("data_files", data_files), ("revision", revision), ("cache_dir", cache_dir))
              if v is not None}
    fields = dict(prompt_field=prompt_field, output_field=output_field, instruction_field=instruction_field,
                  input_field=input_field, limit=max_examples)

    def split(split_name: str) -> list[dict]:
        return _map_rows(_load(path, name, split_name, **kwargs), f"{path}[{split_name}]", **fields)

    train = split(train_split)
    dev = split(dev_split) if dev_split else []
    if not dev_split:
        train, dev = carve(train, dev_size, seed)
    test = split(test_split) if test_split else []
    return DataSplits(train=train, dev=dev, test=test, source=f"hub({path}{'/' + name if name else ''})")


# ---------------------------------------------------------------------------------------------- dolly
def _key(record: dict) -> tuple:
    """Identity of a Dolly record across sources (whitespace at the ends ignored)."""
    output = record["output"] if isinstance(record["output"], str) else record["output"][0]
    return (str(record.get("instruction", record.get("prompt"))).strip(), str(record.get("input") or "").strip(),
            output.strip())


def dolly_splits(path: str = DOLLY_HUB_ID, dev_size: int = 1000, test_size: int = 500, seed: int = 42,
                 dev: str | None = None, test: str | None = None, max_examples: int | None = None,
                 cache_dir: str | None = None) -> DataSplits:
    """databricks-dolly-15k as used by MiniLLM/DSKD (Alpaca template, ``context`` → input,
    ``response`` → output).

    ``path`` a local folder with ``train.jsonl`` and ``valid.jsonl`` (or ``dev.jsonl``), optionally
    ``test.jsonl``: the files of the MiniLLM/DSKD processing, used as they are. ``path`` anything else
    (the hub id ``databricks/databricks-dolly-15k``, 15,011 rows with ``instruction``/``context``/
    ``response``/``category``, or a local copy of that repository): loaded with ``datasets`` and split
    deterministically: a ``random.Random(seed)`` permutation, the first ``test_size`` (500) rows → test, the
    next ``dev_size`` (1000) → dev, the rest → train (MiniLLM's split sizes; its exact rows came from a
    pre-shuffled file it distributes, so the rows differ). ``dev`` / ``test`` JSONL files (e.g. the published
    splits in $PREFKD_SHARED/data/instruct) replace the carved ones; their records are removed before carving, so
    they never leak into training (nor into a carved split). MiniLLM also dropped examples whose prompt
    exceeded 256 tokens; prefkd truncates instead (docs/methods.md §1) and keeps them.
    """
    folder = Path(path).expanduser()
    if (folder / "train.jsonl").is_file():
        train = read_jsonl(folder / "train.jsonl")
        dev_file = next((folder / n for n in ("valid.jsonl", "dev.jsonl") if (folder / n).is_file()), None)
        dev_records = read_jsonl(dev) if dev else read_jsonl(dev_file) if dev_file else []
        test_records = read_jsonl(test) if test else \
            read_jsonl(folder / "test.jsonl") if (folder / "test.jsonl").is_file() else []
        return DataSplits(train=train[:max_examples] if max_examples else train, dev=dev_records,
                          test=test_records, source=f"dolly({folder})")
    rows = _load(path, None, "train", **({"cache_dir": cache_dir} if cache_dir else {}))
    given_dev, given_test = read_jsonl(dev) if dev else None, read_jsonl(test) if test else None
    splits = dolly_rows_splits(rows, f"{path}[train]", dev_size, test_size, seed, given_dev, given_test)
    train = splits.train[:max_examples] if max_examples else splits.train
    return DataSplits(train=train, dev=splits.dev, test=splits.test, source=f"dolly({path})")


def dolly_rows_splits(rows, where: str = "dolly", dev_size: int = 1000, test_size: int = 500, seed: int = 42,
                      given_dev: list[dict] | None = None, given_test: list[dict] | None = None) -> DataSplits:
    """The processing of :func:`dolly_splits` on the rows of databricks-dolly-15k (dicts with ``instruction``,
    ``context``, ``response``, ``category``, as ``datasets`` yields them): ``context`` → ``input``, ``response`` →
    ``output``, the Alpaca prompt, ``category`` kept; a ``random.Random(seed)`` permutation, the first
    ``test_size`` → test, the next ``dev_size`` → dev, the rest → train. ``given_dev`` / ``given_test`` replace the
    carved splits and their records are removed from the pool first. ``where`` names the rows in errors."""
    records = _map_rows(rows, where, prompt_field="prompt", output_field="response",
                        instruction_field="instruction", input_field="context")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = {_key(r) for r in (given_dev or []) + (given_test or [])}
    pool = [records[i] for i in order if _key(records[i]) not in held_out]
    if given_test is None:
        given_test, pool = pool[:test_size], pool[test_size:]
    if given_dev is None:
        given_dev, pool = pool[:dev_size], pool[dev_size:]
    return DataSplits(train=pool, dev=given_dev, test=given_test, source=f"dolly({where})")


# ---------------------------------------------------------------------------------------------- conversations
def _conversations(path: str, field: str, split: str, name: str | None) -> list[tuple[list, str]]:
    """(conversation, where) per row of a local JSONL file (one object per line with ``field``) or of a hub dataset
    (``datasets.load_dataset(path, name, split=split)``, its column ``field``)."""
    local = Path(path).expanduser()
    if local.is_file():
        rows = read_jsonl(local, required=(field,))
        return [(row[field], f"{local} conversation {i + 1}") for i, row in enumerate(rows)]
    if local.suffix in (".jsonl", ".json") or str(path).startswith(("/", ".", "~")):  # a file, not a hub id
        read_jsonl(local, required=(field,))  # the missing file's error, with how to point at it
    rows = _load(path, name, split)
    if field not in rows.column_names:
        raise DataError(f"{path}[{split}]: no column {field!r} (columns: {rows.column_names}); set "
                        f"dataset.source.field to the column holding the conversations.")
    return [(row[field], f"{path}[{split}] row {i}") for i, row in enumerate(rows)]


def messages_splits(train: str | Sequence[str], dev: str | None = None, test: str | None = None,
                    dev_size: int = 0, seed: int = 0, train_on: str = "last", field: str = "messages",
                    strip: bool = True, split: str = "train", name: str | None = None,
                    limit: int | None = None) -> DataSplits:
    """Conversations (``[{role, content}, ...]`` per row, in column ``field``) from local JSONL files or a hub id, as
    chat records (:func:`prefkd.data.chat.conversation_records`: the last assistant turn of each, or every one with
    ``train_on="all"``). Without a ``dev`` file, ``dev_size`` **conversations** are carved from train (``seed``), so
    no conversation has turns in two splits. ``limit``: the first N conversations of train."""
    from prefkd.data.chat import conversation_records

    paths = [train] if isinstance(train, (str, os.PathLike)) else list(train)
    if not paths:
        raise DataError("dataset.source.train is an empty list; give a JSONL path, a hub id or a list of them.")
    conversations = [c for path in paths for c in _conversations(str(path), field, split, name)][:limit]
    dev_conversations = _conversations(str(dev), field, split, name) if dev else []
    if not dev:
        conversations, dev_conversations = carve(conversations, dev_size, seed)

    def records(items: list[tuple[list, str]]) -> list[dict]:
        return [r for conversation, where in items
                for r in conversation_records(conversation, train_on, strip=strip, where=where)]

    test_records = records(_conversations(str(test), field, split, name)) if test else []
    source = f"messages({'+'.join(Path(str(p)).name for p in paths)},{train_on})"
    return DataSplits(train=records(conversations), dev=records(dev_conversations), test=test_records, source=source)
