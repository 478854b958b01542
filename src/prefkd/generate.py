"""`python -m prefkd.generate model.path=TEACHER [dataset=...] out=FILE.jsonl [key=value ...]`: a model's (the
teacher's) sampled answers to a dataset's prompts as a training JSONL, for sequence-level KD (SeqKD, Kim & Rush 2016):
train on it with ``dataset=jsonl dataset.source.train=FILE.jsonl``, or mix it with the original answers with
``dataset.source.train=[FILE.jsonl,orig.jsonl]``.

**The file.** One JSON object per line, in the split's order: ``prompt`` (the record's prompt, as given),
``output`` (the answer, decoded and stripped), ``reference`` (the record's own ``output``), ``index`` (the record's
0-based position in the split), ``sample`` (which of ``num_samples`` answers, only when there are several),
``num_tokens`` (answer tokens up to the first EOS) and ``truncated`` (the answer hit ``sampling.max_new_tokens``
without an EOS; training learns no EOS at its end). Nothing else is in the file, so ``dataset=jsonl`` reads it.

**Empty answers** (the model stopped at once, or produced only whitespace) are left out of the file, since a
training record needs a non-empty ``output``; how many is logged and kept in the side file.

**The side file** ``FILE.jsonl.config.json`` holds the settings the answers depend on (model, dataset, split,
sampling, seed, batch size, samples per prompt, precision, and a hash of the split's prompts) and the progress
(answers done, lines and bytes of the file after the last finished batch).

**Resuming.** Batch b of the items (prompt, sample) is sampled with the seed ``batch_seed(seed, b)``
(:mod:`prefkd.eval.generation`), and batches are always whole batches of the split, even when ``limit`` ends in
the middle of one (its other answers are dropped). So ``limit=N`` writes the first N records' lines of the full
run, and a rerun (after a kill, or with a larger limit) cuts the file back to the last finished batch recorded
in the side file (a half-written line from a kill goes with it), starts again at the batch holding the first
missing item and appends: the file is then byte for byte the one an uninterrupted run writes. A rerun with
other settings is refused, naming the key; device, limit, progress and num_threads may change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from prefkd.data.chat import prompt_of
from prefkd.eval.generation import Sampling, generate_batches
from prefkd.training.schema import check_entry, reported
from prefkd.utils.config import config_dir, load_env
from prefkd.utils.devices import set_num_threads
from prefkd.utils.io import atomic_write

log = logging.getLogger("prefkd.generate")

FORMAT = "prefkd-generate-1"  # the side file's layout
SPLITS = ("train", "dev", "test")


class GenerateError(ValueError):
    """A bad setting, or an output file that cannot be resumed; the message names the key and the fix."""


@dataclass
class Progress:
    """How far a file is: ``items`` (prompt, sample) pairs done, the file's ``lines`` and ``bytes`` after the last
    finished batch, and the ``empty`` answers left out and ``truncated`` ones written so far."""

    items: int = 0
    lines: int = 0
    bytes: int = 0
    empty: int = 0
    truncated: int = 0


def side_file(out: Path) -> Path:
    """``FILE.jsonl.config.json``: the settings and progress of ``out``."""
    return out.with_name(out.name + ".config.json")


# ---------------------------------------------------------------------------------------------- settings
def check_config(cfg: DictConfig) -> Path:
    """The keys that need no data or model (their types and ranges: :mod:`prefkd.training.schema`); returns ``out``
    as a path. Errors name the key and the fix."""
    if not cfg.out:
        raise GenerateError("out= is required: the JSONL file to write, e.g. out=outputs/seqkd/teacher_train.jsonl "
                            "(an existing file made by prefkd.generate is resumed).")
    if cfg.model.path is None and cfg.model.adapter is None:
        raise GenerateError("model.path= is required: the model whose answers are written (the teacher: a "
                            "checkpoint directory, hub id, .gguf file or package:<pkg>/<file>.gguf).")
    if cfg.dataset.get("kind", "instruct") == "preference":
        raise GenerateError(f"dataset {cfg.dataset.source._target_} holds preference pairs; generate answers to "
                            f"instruction prompts (dataset=hh_sft for the prompts of pairs, or any instruction set).")
    out = Path(cfg.out).expanduser()
    if out.is_dir():
        raise GenerateError(f"out={cfg.out!r} is a directory; give a file path such as {out / 'generations.jsonl'}.")
    return out


def split_records(cfg: DictConfig) -> list[dict]:
    """The records of ``cfg.split`` of the dataset (read and checked before any model loads)."""
    splits = instantiate(cfg.dataset.source)
    records = getattr(splits, cfg.split)
    if not records:
        sizes = ", ".join(f"{name}: {len(getattr(splits, name))}" for name in SPLITS)
        raise GenerateError(f"split={cfg.split!r}: dataset {splits.source} has no {cfg.split} records ({sizes}); "
                            f"pick a split it has, or give it {cfg.split} records (dataset=jsonl: "
                            f"dataset.source.{cfg.split}=FILE.jsonl).")
    return records


def sampling_of(cfg: DictConfig) -> Sampling:
    """The decoding settings of ``cfg.sampling``."""
    return Sampling(**OmegaConf.to_container(cfg.sampling, resolve=True))


def prompts_digest(records: list[dict]) -> str:
    """A hash of the split's prompts, in order: a resumed file must answer the same prompts."""
    digest = hashlib.sha256()
    for record in records:  # a chat record's prompt is its history (each model renders it with its template)
        prompt = record["prompt"] if "messages" not in record else json.dumps(record["messages"], ensure_ascii=False)
        digest.update(prompt.encode("utf-8") + b"\x00")
    return digest.hexdigest()


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(f"{prefix}.{key}", item).items()}
    return {prefix: value}


def settings_of(cfg: DictConfig, records: list[dict]) -> dict:
    """What the answers depend on, as ``{config key: value}`` (the keys a user types), JSON-normalised."""
    source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    settings = {"model.path": cfg.model.path, "model.adapter": cfg.model.adapter,
                "model.tokenizer_path": cfg.model.tokenizer_path, "precision": cfg.precision,
                **_flatten("dataset.source", source), "split": cfg.split,
                "dataset.prompts_sha256": prompts_digest(records), "seed": cfg.seed, "batch_size": cfg.batch_size,
                "num_samples": cfg.num_samples, **_flatten("sampling", asdict(sampling_of(cfg)))}
    return json.loads(json.dumps(settings))


def differences(old: dict, new: dict) -> list[str]:
    """``key=old there, new now`` for every key whose value differs (the prompts' hash last, without the hashes)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    notes = [f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in keys if k != "dataset.prompts_sha256"]
    if "dataset.prompts_sha256" in keys:
        notes.append("the split's prompts are not the same (dataset.prompts_sha256): the data changed")
    return notes


# ---------------------------------------------------------------------------------------------- the file
def write_side(out: Path, settings: dict, progress: Progress) -> None:
    """The side file, atomically (a kill leaves the previous one)."""
    atomic_write(side_file(out), json.dumps({"format": FORMAT, "settings": settings, "progress": asdict(progress)},
                                            indent=2, ensure_ascii=False) + "\n")


def _start_over(out: Path) -> str:
    return (f"write to another out=..., or delete {out} and {side_file(out)} to start over")


def resume_state(out: Path, settings: dict) -> Progress:
    """The progress of ``out``, after checking its settings and cutting it back to the last finished batch; a new
    (empty) file and side file when there is none. Errors name the differing key and the fix."""
    side = side_file(out)
    if not out.is_file() or (out.stat().st_size == 0 and not side.is_file()):
        if side.is_file():
            log.info("%s has a side file but no %s: starting over", side, out.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"")
        write_side(out, settings, Progress())
        return Progress()
    if not side.is_file():
        raise GenerateError(f"out={str(out)!r} exists but has no side file {side.name}: it was not written by "
                            f"prefkd.generate (or the side file was deleted), so it cannot be resumed; "
                            f"{_start_over(out)}.")
    recorded = json.loads(side.read_text(encoding="utf-8"))
    if recorded.get("format") != FORMAT:
        raise GenerateError(f"{side} has format {recorded.get('format')!r}, not {FORMAT!r}; {_start_over(out)}.")
    if diff := differences(recorded["settings"], settings):
        raise GenerateError(f"{out} was generated with other settings: {'; '.join(diff)}. Resuming would mix them: "
                            f"run with the same settings, or {_start_over(out)}.")
    progress = Progress(**recorded["progress"])
    size = out.stat().st_size
    if size < progress.bytes:
        raise GenerateError(f"{out} holds {size} bytes but {side.name} records {progress.bytes} after its last "
                            f"finished batch: the file was cut or edited; {_start_over(out)}.")
    if size > progress.bytes:
        log.warning("%s: dropping %d bytes written after the last finished batch (an interrupted run)", out,
                    size - progress.bytes)
        os.truncate(out, progress.bytes)
    return progress


def answer_line(record: dict, index: int, sample: int | None, text: str, num_tokens: int,
                max_new_tokens: int) -> dict:
    """One line of the file (see the module docstring)."""
    asked = {"messages": record["messages"]} if "messages" in record else {"prompt": record["prompt"]}
    line = {**asked, "output": text, "reference": record.get("output"), "index": index}
    if sample is not None:
        line["sample"] = sample
    return {**line, "num_tokens": num_tokens, "truncated": num_tokens >= max_new_tokens}


def append_lines(out: Path, lines: list[dict]) -> int:
    """Append ``lines`` to ``out``, flushed to disk; returns the file's new size."""
    with open(out, "ab") as f:
        f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


# ---------------------------------------------------------------------------------------------- the run
def run(cfg: DictConfig) -> dict:
    """Write (or resume) ``cfg.out``; returns the side file's content. Every setting and the data are checked, and a
    resumed file's settings compared, before the model loads."""
    check_entry(cfg, "generate")
    out = check_config(cfg)
    set_num_threads(cfg.num_threads)
    records = split_records(cfg)
    settings = settings_of(cfg, records)
    sampling = sampling_of(cfg)
    k, batch_size = cfg.num_samples, cfg.batch_size
    n_records = min(cfg.limit or len(records), len(records))
    if cfg.limit and cfg.limit > len(records):
        log.info("limit=%d: the %s split has only %d records; answering all of them", cfg.limit, cfg.split,
                 len(records))
    target = n_records * k  # items (prompt, sample) to be done when this run ends
    progress = resume_state(out, settings)
    if progress.items >= target:
        log.info("%s already holds the answers to the first %d records (%d lines): nothing to do", out,
                 progress.items // k, progress.lines)
        return summarize(out, settings, progress)
    n_batches = math.ceil(target / batch_size)
    end = min(n_batches * batch_size, len(records) * k)  # whole batches, as in a run without limit
    start_batch = progress.items // batch_size
    if progress.items:
        log.info("resuming %s at record %d (%d lines written)", out, progress.items // k, progress.lines)

    bundle = instantiate(cfg.model)
    bundle.model.eval()
    prompts = [prompt_of(records[i // k], bundle.tokenizer, f"{cfg.split} record {i // k}") for i in range(end)]
    batches = generate_batches(bundle.model, bundle.tokenizer, prompts, sampling=sampling, batch_size=batch_size,
                               seed=cfg.seed, start_batch=start_batch)
    bar = tqdm(batches, total=n_batches, initial=start_batch, desc=f"generating {cfg.split}", unit="batch",
               disable=not cfg.progress)
    for b, gens in bar:
        lines = []
        for j, (text, num_tokens) in enumerate(zip(gens.texts, gens.num_tokens)):
            item = b * batch_size + j
            if not progress.items <= item < target:
                continue  # written before a resume, or past the limit
            if not text:
                progress.empty += 1
                continue
            lines.append(answer_line(records[item // k], item // k, item % k if k > 1 else None, text, num_tokens,
                                     sampling.max_new_tokens))
        progress.truncated += sum(line["truncated"] for line in lines)
        progress.bytes = append_lines(out, lines)
        progress.lines += len(lines)
        progress.items = min((b + 1) * batch_size, target)
        write_side(out, settings, progress)
        bar.set_postfix(lines=progress.lines, empty=progress.empty)
    return summarize(out, settings, progress)


def summarize(out: Path, settings: dict, progress: Progress) -> dict:
    """Log what the file holds; returns the side file's content."""
    log.info("%s: %d answers to %d records (%d empty answers left out, %d cut at max_new_tokens); settings in %s",
             out, progress.lines, math.ceil(progress.items / settings["num_samples"]), progress.empty,
             progress.truncated, side_file(out).name)
    if progress.empty:
        log.warning("%d empty answers were left out of %s (a training record needs a non-empty output)",
                    progress.empty, out)
    return {"format": FORMAT, "settings": settings, "progress": asdict(progress)}


@hydra.main(config_path=config_dir(), config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    load_env()
    with reported():
        result = run(cfg)
    p = result["progress"]
    print(f"generated: {cfg.out} ({p['lines']} lines, {p['empty']} empty answers left out, {p['truncated']} cut at "
          f"max_new_tokens)")


if __name__ == "__main__":
    main()
