"""Instruction records: the Alpaca templates of docs/methods.md §1, record validation and a JSONL reader.

A record is a dict with ``prompt`` (already templated) and ``output`` (a string, or a non-empty list of
reference strings in evaluation sets such as S-NI). Records that carry ``instruction`` / ``input`` and no
``prompt`` get the Alpaca template. Every problem is a :class:`DataError` whose message names the field,
the place (file and 1-based line) and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

RECORD_HELP = ("each line must be a JSON object with `prompt` (the templated prompt) and `output` (the reference "
               "response), or `instruction` (+ optional `input`) and `output`, or `messages` (the conversation so far, "
               "rendered by each model's chat template) and `output`")
PAIR_HELP = ("each line must be a JSON object with `chosen` and `rejected` (two full HH dialogues), or `prompt`, "
             "`chosen` and `rejected` (a preference pair; optional `chosen_weight`/`rejected_weight`)")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A record or a data file is malformed. The message names the field, the place and the fix."""


def alpaca_prompt(instruction: str, input: str | None = "") -> str:
    """The Alpaca prompt of docs/methods.md §1: the with-input variant when ``input`` is non-empty."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def check_unicode(value, field: str, where: str) -> None:
    """A string (or list of strings) that is not encodable as UTF-8 (a lone surrogate such as ``"\\ud83d"``, half
    an emoji, which JSON allows) is a :class:`DataError` naming the field and the record."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: field {field!r} holds a character that is not valid Unicode text "
                                f"({text[e.start:e.end]!r} at position {e.start}: a lone surrogate, e.g. half of an "
                                f"emoji); remove it or fix the record.") from None


def _check_output(output, where: str) -> None:
    if isinstance(output, str):
        if not output.strip():
            raise DataError(f"{where}: field 'output' is empty; give every record a non-empty reference "
                            f"response (or remove the record).")
        return
    if isinstance(output, list):
        if not output:
            raise DataError(f"{where}: field 'output' is an empty list; give at least one reference string.")
        for k, ref in enumerate(output):
            if not isinstance(ref, str) or not ref.strip():
                raise DataError(f"{where}: field 'output' reference {k} is {ref!r}; every reference must be a "
                                f"non-empty string.")
        return
    raise DataError(f"{where}: field 'output' is a {type(output).__name__}; it must be a string (or a list of "
                    f"reference strings for evaluation sets).")


def check_messages(messages, where: str, *, ends_with: str | None = "user") -> None:
    """A conversation: a non-empty list of ``{"role": system|user|assistant, "content": str}``, each content valid
    Unicode; ``ends_with``: the role of its last turn (``user``: the history before an answer). Else a
    :class:`DataError` naming the turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns, got "
                        f"{messages!r:.80}.")
    for k, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: turn {k} of 'messages' is {turn!r:.80}; each turn must be {{\"role\": one of "
                            f"{', '.join(ROLES)}, \"content\": a string}}.")
        check_unicode(turn["content"], f"messages[{k}].content", where)
    if ends_with is not None and messages[-1]["role"] != ends_with:
        raise DataError(f"{where}: the history's last turn has role {messages[-1]['role']!r}; the answer to learn "
                        f"must follow a {ends_with!r} turn.")


def to_instruction_record(raw: dict, where: str) -> dict:
    """Return a copy of ``raw`` with ``prompt`` and ``output`` checked (other fields are kept).

    ``where`` names the record in error messages (e.g. ``"train.jsonl line 12"``). A record without
    ``prompt`` but with ``instruction`` gets the Alpaca template (``input`` may be missing, None or ""). A chat
    record (``messages``: the history, ending with a user turn) keeps no prompt of its own: each model renders it
    with its chat template (:mod:`prefkd.data.chat`).
    Raises :class:`DataError` on a missing/empty ``output`` or a missing prompt.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}; {RECORD_HELP}.")
    record = dict(raw)
    if record.get("messages") is not None:
        check_messages(record["messages"], where)
    elif "prompt" not in record or record["prompt"] is None:
        if record.get("instruction") is None:
            raise DataError(f"{where}: missing field 'prompt' (and no 'instruction' to build it from); "
                            f"{RECORD_HELP}.")
        if not isinstance(record["instruction"], str):
            raise DataError(f"{where}: field 'instruction' must be a string, got "
                            f"{type(record['instruction']).__name__}.")
        record["prompt"] = alpaca_prompt(record["instruction"], record.get("input") or "")
    elif not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string, got {record['prompt']!r}.")
    if "output" not in record or record["output"] is None:
        raise DataError(f"{where}: missing field 'output'{other_format(record, ('prompt', 'output'))}; "
                        f"{RECORD_HELP}.")
    _check_output(record["output"], where)
    if "prompt" in record:
        check_unicode(record["prompt"], "prompt", where)
    check_unicode(record["output"], "output", where)
    return record


def format_help(required: tuple[str, ...]) -> str:
    """What a line of a file read with ``required`` fields must hold: instruction records (:data:`RECORD_HELP`),
    preference pairs (:data:`PAIR_HELP`) or objects with those fields."""
    if "prompt" in required and "output" in required:
        return RECORD_HELP
    if {"chosen", "rejected"} <= set(required):
        return PAIR_HELP
    return f"each line must be a JSON object with {', '.join(f'`{name}`' for name in required)}"


def other_format(record: dict, required: tuple[str, ...]) -> str:
    """A hint when a record holds the other kind of data: pairs given to an instruction reader, or the reverse."""
    if "output" in required and "output" not in record and {"chosen", "rejected"} <= set(record):
        return (" (this line holds `chosen`/`rejected`: a preference pair; pairs are read by dataset=hh, their "
                "chosen responses as instruction records by dataset=hh_sft)")
    if "chosen" in required and "chosen" not in record and "output" in record:
        return (" (this line holds `output`: an instruction record; instruction records are read by dataset=jsonl, "
                "pairs need `chosen` and `rejected`)")
    return ""


def read_jsonl(path, required: Iterable[str] = ("prompt", "output")) -> list[dict]:
    """Read a JSONL file into a list of records (blank lines are skipped).

    With the default ``required`` the records go through :func:`to_instruction_record` (Alpaca template,
    output checks). Other ``required`` fields (e.g. ``("prompt", "chosen", "rejected")``) are checked for
    presence and, for strings, non-emptiness. Errors: :class:`FileNotFoundError` naming the path,
    :class:`DataError` naming the field, the file, the 1-based line and the fix.
    """
    path = Path(path).expanduser()
    required = tuple(required)
    fields = format_help(required)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not found"
        from prefkd.data.fetch import missing_data_hint  # (fetch reads records: imported when needed)

        hint = missing_data_hint(path)  # a file `prefkd.data fetch` writes, or one under PREFKD_SHARED: say how
        raise FileNotFoundError(f"{path}: {what}; {f'{hint}; ' if hint else ''}expected a JSONL file "
                                f"({fields}).")
    instruction = "prompt" in required and "output" in required
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix that line so that "
                                f"it holds exactly one JSON object ({fields}).") from None
            if not isinstance(raw, dict):
                raise DataError(f"{where}: a line must hold a JSON object, got {type(raw).__name__}; "
                                f"{fields}.")
            record = to_instruction_record(raw, where) if instruction else dict(raw)
            for name in required:
                value = record.get(name)
                if value is None:
                    raise DataError(f"{where}: missing field {name!r}{other_format(record, required)}; add it to "
                                    f"every line (required fields: {', '.join(required)}; {fields}).")
                if isinstance(value, str) and not value.strip():
                    raise DataError(f"{where}: field {name!r} is empty; give it a non-empty string "
                                    f"(or remove the line).")
            records.append(record)
    if not records:
        kind = "preference pairs" if fields == PAIR_HELP else "records"
        raise DataError(f"{path}: the file holds no {kind} (it is empty or holds only blank lines); {fields}.")
    return records
