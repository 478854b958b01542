"""``python -m prefkd.data fetch [NAME ...] [--dir DIR] [--from DIR]``: the evaluation sets, the Dolly splits and the
HH pairs from their public hub datasets, converted to prefkd's JSONL (docs/methods.md §1, §9, §10).

Each set is written under ``--dir`` (default ``$PREFKD_DATA``, else ``~/.cache/prefkd/data``) with the file names of
the project's shared copy, so one layout serves both; the configs' ``${data_file:instruct/dolly_test.jsonl}`` looks
there first, then under ``$PREFKD_SHARED/data``. Instruction records hold ``instruction``, ``input`` (where the set
has one), ``output`` (a string, or a list of references for S-NI / UnNI), ``prompt`` (the Alpaca template of §1,
rebuilt from ``instruction``/``input``) and the set's label (``topic`` or ``category``) when it has one; preference
records hold the two full HH dialogues ``chosen`` and ``rejected``.

========= ==================================== ============================== ========================= ================
name      hub id                               what is read                   records written           shared copy
========= ==================================== ============================== ========================= ================
dolly     databricks/databricks-dolly-15k      split train (15,011 rows)      test 500, dev 1,000,      500 / 1,000
                                                                              train 13,511
self_inst MiniLLM/self-inst                    valid.jsonl                    242                       242
vicuna    MiniLLM/Vicuna                       valid.jsonl                    80                        80
sinst     MiniLLM/sinst                        11_/valid.jsonl                1,694                     1,694
unni      MiniLLM/uinst                        11_/valid.jsonl, first 10,000  10,000                    none
dialogsum knkarthick/dialogsum                 split test                     1,500                     1,500
hh        Anthropic/hh-rlhf                    harmless-base, split test      2,312                     2,312
========= ==================================== ============================== ========================= ================

- **dolly**: the processing of ``dataset=dolly`` (:func:`prefkd.data.sources.dolly_rows_splits`, seed 42):
  ``context`` → ``input``, ``response`` → ``output``, ``category`` → ``topic``; a ``random.Random(42)`` permutation,
  the first 500 → ``instruct/dolly_test.jsonl``, the next 1,000 → ``instruct/dolly_dev.jsonl``, the rest →
  ``instruct/dolly_train.jsonl``. These are the splits ``dataset=dolly`` carves, so training on its train split never
  sees the fetched test; they are not MiniLLM's rows (the shared copy holds those), and the three files belong
  together. Nothing is dropped (MiniLLM dropped prompts over 256 tokens; prefkd truncates them).
- **self_inst, vicuna, sinst, unni**: the evaluation files MiniLLM published (the sets the MiniLLM/DSKD papers
  report): the Self-Instruct user-oriented set, Vicuna's 80 questions with reference answers, the S-NI test tasks'
  instances and the Unnatural Instructions core set whose references have at least 11 words (MiniLLM's ``11_``
  bucket; UnNI: its first 10,000, MiniLLM's ``--dev-num 10000``). Kept: ``instruction``, ``input``, ``output`` and
  ``topic``/``category``; other columns are dropped, the prompt is rebuilt with the Alpaca template. A row whose
  reference is empty is dropped (a warning counts them).
- **dialogsum**: the DialogSum test set (500 dialogues × 3 summaries): ``instruction`` = "Generate a summary of the
  dialogue, focusing specifically on the provided topic: {topic}.", ``input`` = ``dialogue``, ``output`` =
  ``summary``; ``id`` and ``topic`` are dropped.
- **hh**: Anthropic HH-RLHF harmless-base test, ``chosen``/``rejected`` as they are (prefkd's reader splits the
  prompt off, §10); every pair is kept, including the few with equal responses (``skip_invalid`` drops them when
  read).

``--from DIR`` reads local copies of the hub files instead (jsonl, json, csv or parquet, as ``datasets.load_dataset``
reads a folder): ``DIR/NAME`` or ``DIR/<hub id>`` for each set, or ``DIR`` itself for a single set. A copy laid out
like the hub repository (``DIR/hh/harmless-base/test.jsonl.gz``, ``DIR/sinst/11_/valid.jsonl``) is read as the hub
is; a folder holding just the set's file(s) works too (its only split, or the split named as on the hub).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefkd.data.preference import to_pair
from prefkd.data.records import DataError, to_instruction_record
from prefkd.data.sources import DOLLY_HUB_ID, dolly_rows_splits
from prefkd.utils.config import data_dir, data_relpath, missing_shared_file
from prefkd.utils.io import atomic_file

log = logging.getLogger(__name__)

Converted = dict[str, list[dict]]  # output file (relative to the data folder) -> its records
PROGRESS_MIN_ROWS = 5000  # a progress bar for conversions of at least this many rows
DIALOGSUM_INSTRUCTION = "Generate a summary of the dialogue, focusing specifically on the provided topic: {topic}."
UNNI_LIMIT = 10_000  # MiniLLM evaluates the first 10,000 UnNI examples (--dev-num 10000)


class FetchError(DataError):
    """A set could not be fetched or converted; the message names the set, its hub id and the way out."""


# ------------------------------------------------------------------------------------------------- converters
def dolly_records(rows: Iterable[dict], seed: int = 42) -> Converted:
    """databricks-dolly-15k rows (``instruction``, ``context``, ``response``, ``category``) → the test / dev / train
    splits of ``dataset=dolly`` (:func:`~prefkd.data.sources.dolly_rows_splits`, 500 / 1,000 / rest), with
    ``category`` named ``topic`` as in MiniLLM's files."""
    splits = dolly_rows_splits(rows, DOLLY_HUB_ID, seed=seed)

    def shared_fields(record: dict) -> dict:
        return {**({"topic": record["category"]} if record.get("category") else {}),
                "instruction": record["instruction"], "input": record["input"], "output": record["output"],
                "prompt": record["prompt"]}

    return {f"instruct/dolly_{split}.jsonl": [shared_fields(r) for r in records]
            for split, records in (("test", splits.test), ("dev", splits.dev), ("train", splits.train))}


def _label(row: dict) -> dict:
    return {key: row[key] for key in ("topic", "category") if row.get(key)}


def instruction_records(rows: Iterable[dict], where: str, limit: int | None = None) -> list[dict]:
    """Rows with ``instruction``, optional ``input``, ``output`` (a string or a list of references) and optional
    ``topic``/``category`` → prefkd records with the Alpaca ``prompt`` (docs/methods.md §1); other columns are dropped
    (``input`` is kept where the rows have that column: Vicuna's have none).
    The first ``limit`` rows; a row with an empty reference is dropped (logged), any other defect is a
    :class:`DataError` naming ``where`` and the row."""
    records, dropped = [], []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        if not isinstance(row.get("instruction"), str):
            raise DataError(f"{where} row {i}: no string field 'instruction' (fields: {sorted(row)}); is this the "
                            f"set's hub file?")
        record = {**_label(row), "instruction": row["instruction"],
                  **({"input": row["input"] or ""} if "input" in row else {}), "output": row.get("output")}
        try:
            records.append(to_instruction_record(record, f"{where} row {i}"))
        except DataError as e:
            if "empty" not in str(e):
                raise
            dropped.append(i)
    if dropped:
        log.warning("%s: dropped %d rows with an empty reference (rows %s)", where, len(dropped),
                    ", ".join(map(str, dropped[:10])) + (" ..." if len(dropped) > 10 else ""))
    return records


def dialogsum_records(rows: Iterable[dict], where: str = "knkarthick/dialogsum") -> list[dict]:
    """DialogSum rows (``id``, ``dialogue``, ``summary``, ``topic``) → records: the topic-focused summary instruction,
    the dialogue as ``input``, the summary as ``output``."""
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("dialogue", "summary", "topic") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{where} row {i}: no string field(s) {missing} (fields: {sorted(row)}); is this "
                            f"DialogSum's hub file?")
        record = {"instruction": DIALOGSUM_INSTRUCTION.format(topic=row["topic"]), "input": row["dialogue"],
                  "output": row["summary"]}
        out.append(to_instruction_record(record, f"{where} row {i}"))
    return out


def hh_records(rows: Iterable[dict], where: str = "Anthropic/hh-rlhf") -> list[dict]:
    """HH-RLHF rows (``chosen``, ``rejected``: full dialogues) → ``{"chosen", "rejected"}``, each checked to split
    into a prompt and two responses (docs/methods.md §10); pairs with equal or empty responses are kept."""
    out = []
    for i, row in enumerate(rows):
        record = {"chosen": row.get("chosen"), "rejected": row.get("rejected")}
        to_pair(record, f"{where} row {i}", check=False)
        out.append(record)
    return out


# ------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class FetchSet:
    """One fetchable set: where it is on the hub and how its rows become prefkd's files."""

    name: str
    hub_id: str
    split: str  # the split read (as ``datasets`` names it)
    convert: Callable[[Iterable[dict]], Converted]  # rows -> {output file: records}
    files: tuple[str, ...]  # output files, relative to the data folder
    sizes: str  # records written, for --help
    load: dict[str, Any] = field(default_factory=dict)  # more load_dataset arguments: data_files / data_dir

    def what(self) -> str:
        """What is read of the hub dataset, e.g. ``data_dir=harmless-base, split test``."""
        return ", ".join([*(f"{k}={v}" for k, v in self.load.items()), f"split {self.split}"])

    def describe(self) -> str:
        return f"{self.name:<10} {self.hub_id} ({self.what()}) -> {', '.join(self.files)}: {self.sizes}"


def _one(file: str, convert: Callable[[Iterable[dict], str], list[dict]], where: str, **kwargs) -> Callable:
    return lambda rows: {file: convert(rows, where, **kwargs)}


SETS: dict[str, FetchSet] = {s.name: s for s in [
    FetchSet("dolly", DOLLY_HUB_ID, "train", dolly_records,
             ("instruct/dolly_test.jsonl", "instruct/dolly_dev.jsonl", "instruct/dolly_train.jsonl"),
             "500 / 1,000 / 13,511 records"),
    FetchSet("self_inst", "MiniLLM/self-inst", "train",
             _one("instruct/self_inst_test.jsonl", instruction_records, "MiniLLM/self-inst"),
             ("instruct/self_inst_test.jsonl",), "242 records", {"data_files": "valid.jsonl"}),
    FetchSet("vicuna", "MiniLLM/Vicuna", "train",
             _one("instruct/vicuna_test.jsonl", instruction_records, "MiniLLM/Vicuna"),
             ("instruct/vicuna_test.jsonl",), "80 records", {"data_files": "valid.jsonl"}),
    FetchSet("sinst", "MiniLLM/sinst", "train",
             _one("instruct/sinst_test.jsonl", instruction_records, "MiniLLM/sinst"),
             ("instruct/sinst_test.jsonl",), "1,694 records", {"data_files": "11_/valid.jsonl"}),
    FetchSet("unni", "MiniLLM/uinst", "train",
             _one("instruct/unni_test.jsonl", instruction_records, "MiniLLM/uinst", limit=UNNI_LIMIT),
             ("instruct/unni_test.jsonl",), "10,000 records", {"data_files": "11_/valid.jsonl"}),
    FetchSet("dialogsum", "knkarthick/dialogsum", "test",
             _one("instruct/dialogsum_test.jsonl", dialogsum_records, "knkarthick/dialogsum"),
             ("instruct/dialogsum_test.jsonl",), "1,500 records"),
    FetchSet("hh", "Anthropic/hh-rlhf", "test",
             _one("preference/hh_harmless_test.jsonl", hh_records, "Anthropic/hh-rlhf harmless-base"),
             ("preference/hh_harmless_test.jsonl",), "2,312 pairs", {"data_dir": "harmless-base"}),
]}
SET_OF_FILE = {file: s.name for s in SETS.values() for file in s.files}


def fetch_command(name: str) -> str:
    return f"python -m prefkd.data fetch {name}"


def missing_data_hint(path: str | Path) -> str:
    """For a missing ``path``: the clause saying how to get it (the fetch command when it is one of the files
    ``prefkd.data fetch`` writes, else what :func:`~prefkd.utils.config.missing_shared_file` says), or ""."""
    local = Path(path).expanduser()
    rel = None if local.exists() else data_relpath(local)
    if rel in SET_OF_FILE:
        return (f"fetch it with `{fetch_command(SET_OF_FILE[rel])}` (writes {Path(data_dir()) / rel}; offline, add "
                f"`--from DIR` with a copy of the hub files), or set PREFKD_SHARED to a folder holding data/{rel}")
    return missing_shared_file(local)


def fetch_hint(paths: Iterable[str | Path]) -> str:
    """For missing data files: ``"fetch them with `python -m prefkd.data fetch dolly sinst` (or set PREFKD_SHARED to
    a folder holding them under data/), or "`` for those ``prefkd.data fetch`` writes; "" when it writes none."""
    names = dict.fromkeys(SET_OF_FILE[rel] for rel in map(data_relpath, paths) if rel in SET_OF_FILE)
    if not names:
        return ""
    return (f"fetch them with `{fetch_command(' '.join(names))}` (or set PREFKD_SHARED to a folder holding them under "
            f"data/), or ")


# ------------------------------------------------------------------------------------------------- loading
def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise FetchError("fetching needs the `datasets` package (pip install datasets).") from e
    return datasets


def local_copy(spec: FetchSet, source: Path, alone: bool) -> Path:
    """The folder of ``spec``'s files under ``--from`` ``source``: ``source/NAME``, ``source/<hub id>``, or (when
    ``alone``: one set fetched) ``source`` itself."""
    candidates = [source / spec.name, source / spec.hub_id] + ([source] if alone else [])
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        raise FetchError(f"{spec.name}: no local copy of {spec.hub_id} under --from {source}: looked for "
                         f"{', '.join(map(str, candidates))}. Put the hub files of "
                         f"https://huggingface.co/datasets/{spec.hub_id} in {source / spec.name}.")
    return found


def load_local(spec: FetchSet, folder: Path, cache_dir: str):
    """``spec``'s split from a local folder: the hub's ``data_files``/``data_dir`` when the folder has them, else
    every file ``datasets`` finds there; the split named as on the hub, or the folder's only split."""
    datasets = _datasets()
    kwargs = {k: v for k, v in spec.load.items() if (folder / v).exists()}
    try:
        loaded = datasets.load_dataset(str(folder), cache_dir=cache_dir, **kwargs)
    except Exception as e:
        raise FetchError(f"{spec.name}: could not read the local copy {folder} ({type(e).__name__}: {e}); it should "
                         f"hold the files of https://huggingface.co/datasets/{spec.hub_id} (jsonl, json, csv or "
                         f"parquet).") from e
    if spec.split in loaded:
        return loaded[spec.split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise FetchError(f"{spec.name}: {folder} holds the splits {sorted(loaded)}, not {spec.split!r}; keep only the "
                     f"{spec.split} file(s) there or name them as on the hub.")


def load_hub(spec: FetchSet, cache_dir: str | None = None):
    """``spec``'s split from the hub (``datasets.load_dataset``); a failure names the set and the ``--from`` way."""
    datasets = _datasets()
    try:
        return datasets.load_dataset(spec.hub_id, split=spec.split, cache_dir=cache_dir, **spec.load)
    except Exception as e:
        raise FetchError(f"{spec.name}: could not load {spec.hub_id} ({spec.what()}) from the hub: "
                         f"{type(e).__name__}: {e}. Offline? Copy the files of "
                         f"https://huggingface.co/datasets/{spec.hub_id} to DIR/{spec.name} on a machine with access "
                         f"and run `{fetch_command(spec.name)} --from DIR`.") from e


def _with_progress(rows, name: str):
    if len(rows) < PROGRESS_MIN_ROWS:
        return rows
    from tqdm.auto import tqdm

    return tqdm(rows, total=len(rows), desc=f"converting {name}", unit=" rows", file=sys.stderr)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, UTF-8, written atomically."""
    with atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def fetch(name: str, out_dir: str | Path, source: str | Path | None = None, alone: bool = True) -> dict[Path, int]:
    """Fetch one set (from the hub, or from the local copy under ``source``), convert it and write its files under
    ``out_dir``. Returns {written file: records}."""
    if name not in SETS:
        raise FetchError(f"unknown set {name!r}; the sets are {', '.join(SETS)}.")
    spec = SETS[name]
    with tempfile.TemporaryDirectory(prefix="prefkd-fetch-") as scratch:
        if source is None:
            rows = load_hub(spec)
        else:  # local files: a throw-away datasets cache, so that converting leaves nothing behind
            rows = load_local(spec, local_copy(spec, Path(source).expanduser(), alone), scratch)
        converted = spec.convert(_with_progress(rows, name))
    written = {}
    for rel, records in converted.items():
        path = Path(out_dir).expanduser() / rel
        write_jsonl(path, records)
        written[path] = len(records)
    return written


# ------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prefkd.data",
                                     description="Data sets prefkd reads, fetched and converted to its JSONL.")
    sub = parser.add_subparsers(dest="command", required=True)
    sets = "\n".join(f"  {s.describe()}" for s in SETS.values())
    fetch_parser = sub.add_parser(
        "fetch", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="fetch sets from the hub (or local copies) into prefkd's JSONL",
        description="Fetch the named sets (all when none is named) and write them as prefkd's JSONL under --dir; "
                    "the configs' ${data_file:...} find them there.",
        epilog=f"sets (name, hub id, what is read, files written, records):\n{sets}\n\n"
               "What each conversion keeps and drops: the docstring of prefkd/data/fetch.py and docs/usage.md.")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME",
                              help=f"sets to fetch: {', '.join(SETS)} (default: all)")
    fetch_parser.add_argument("--dir", default=None,
                              help="output folder (default: $PREFKD_DATA, else ~/.cache/prefkd/data)")
    fetch_parser.add_argument("--from", dest="source", default=None, metavar="DIR",
                              help="read local copies of the hub files (DIR/NAME, DIR/<hub id>, or DIR for one set) "
                                   "instead of the hub")
    return parser


def check_places(names: list[str], out_dir: Path, source: str | None) -> None:
    """Before any set is fetched: ``--dir`` is a folder (or can become one) and, with ``--from``, every named set has
    its local copy there; else a :class:`FetchError` naming the option."""
    blocked = next((p for p in [out_dir, *out_dir.parents] if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise FetchError(f"--dir {out_dir}: {blocked} is a file, not a folder; give a folder (created if missing).")
    if source is not None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FetchError(f"--from {folder}: no such folder; give the folder holding the hub files (DIR/NAME or "
                             f"DIR/<hub id> for each set).")
        for name in dict.fromkeys(names):  # every copy found before the first is converted
            local_copy(SETS[name], folder, alone=len(set(names)) == 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.names or list(SETS)
    unknown = [n for n in names if n not in SETS]
    if unknown:
        print(f"error: unknown set(s) {', '.join(unknown)}; the sets are {', '.join(SETS)}.", file=sys.stderr)
        return 2
    out_dir = Path(args.dir).expanduser() if args.dir else Path(data_dir())
    try:
        check_places(names, out_dir, args.source)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in dict.fromkeys(names):
        try:
            written = fetch(name, out_dir, args.source, alone=len(set(names)) == 1)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for path, count in written.items():
            print(f"{name}: {path} ({count:,} records)")
    return 0
