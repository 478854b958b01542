"""`python -m prefkd.data fetch`: each set's conversion from a local copy in its hub format (written here, with the
hub's field names and file layout), and where the configs' ${data_file:} finds the files."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefkd.data.fetch import (
    DIALOGSUM_INSTRUCTION,
    SET_OF_FILE,
    SETS,
    FetchError,
    build_parser,
    fetch,
    instruction_records,
    load_hub,
)
from prefkd.data.preference import load_pairs
from prefkd.data.records import DataError, alpaca_prompt, read_jsonl
from prefkd.data.sources import dolly_splits
from prefkd.eval.sets import load_eval_set
from prefkd.utils.config import config_dir, data_file

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def hh_row(i: int) -> dict:
    return {"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a kind answer {i}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a rude answer"}


def minillm_row(i: int, **extra) -> dict:
    """A row of MiniLLM's published evaluation files (valid.jsonl): instruction, input, output, prompt, a label."""
    return {"instruction": f"Task {i}: rewrite the text.", "input": f"text {i}" if i % 2 else "",
            "output": f"rewritten {i}", "prompt": "(MiniLLM's own prompt, rebuilt by prefkd)", **extra}


def test_cli_fetches_several_sets_from_a_local_copy_laid_out_like_the_hub(tmp_path):
    """One subprocess: Vicuna (MiniLLM/Vicuna: valid.jsonl beside valid.txt) and HH (Anthropic/hh-rlhf:
    harmless-base/{train,test}.jsonl.gz beside other subsets) → prefkd's files, one summary line per file."""
    hub = tmp_path / "hub"
    write_jsonl(hub / "vicuna" / "valid.jsonl", [minillm_row(i, category="fermi") for i in range(3)])
    (hub / "vicuna" / "valid.txt").write_text("a text copy the conversion must not read\n")
    write_jsonl(hub / "hh" / "harmless-base" / "test.jsonl.gz", [hh_row(i) for i in range(4)])
    write_jsonl(hub / "hh" / "harmless-base" / "train.jsonl.gz", [hh_row(i) for i in range(9)])
    write_jsonl(hub / "hh" / "helpful-base" / "test.jsonl.gz", [hh_row(i) for i in range(7)])
    out = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-m", "prefkd.data", "fetch", "vicuna", "hh", "--from", str(hub),
                           "--dir", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    vicuna, hh = out / "instruct/vicuna_test.jsonl", out / "preference/hh_harmless_test.jsonl"
    assert done.stdout.splitlines() == [f"vicuna: {vicuna} (3 records)", f"hh: {hh} (4 records)"]
    examples = load_eval_set(vicuna)
    assert [e.references for e in examples] == [("rewritten 0",), ("rewritten 1",), ("rewritten 2",)]
    assert examples[0].prompt == alpaca_prompt("Task 0: rewrite the text.")
    assert examples[1].prompt == alpaca_prompt("Task 1: rewrite the text.", "text 1")
    assert {r["category"] for r in read_jsonl(vicuna)} == {"fermi"}
    pairs = load_pairs(hh)
    assert len(pairs) == 4 and pairs[2].prompt == "\n\nHuman: question 2?\n\nAssistant:"
    assert (pairs[2].chosen, pairs[2].rejected) == (" a kind answer 2", " a rude answer")


def test_dolly_is_the_processing_of_dataset_dolly(tmp_path):
    """databricks-dolly-15k's file (instruction/context/response/category) → the test / dev / train splits that
    dolly_splits carves from the same rows (seed 42: 500 / 1,000 / rest), category named topic."""
    categories = ["open_qa", "closed_qa", "brainstorming", "summarization"]
    rows = [{"instruction": f"Question {i}?", "context": f"Context {i}." if i % 3 == 0 else "",
             "response": f"Answer {i}.", "category": categories[i % 4]} for i in range(1530)]
    hub = tmp_path / "hub"
    write_jsonl(hub / "dolly" / "databricks-dolly-15k.jsonl", rows)
    written = fetch("dolly", tmp_path / "data", hub, alone=False)
    assert {p.name: n for p, n in written.items()} == {"dolly_test.jsonl": 500, "dolly_dev.jsonl": 1000,
                                                       "dolly_train.jsonl": 30}
    reference = dolly_splits(str(hub / "dolly"))
    for split, records in (("test", reference.test), ("dev", reference.dev), ("train", reference.train)):
        fetched = read_jsonl(tmp_path / f"data/instruct/dolly_{split}.jsonl")
        expected = [{**{k: v for k, v in r.items() if k != "category"}, "topic": r["category"]} for r in records]
        assert fetched == expected, split
    test = read_jsonl(tmp_path / "data/instruct/dolly_test.jsonl")
    assert sorted(test[0]) == ["input", "instruction", "output", "prompt", "topic"]  # the shared copy's fields
    assert len({r["instruction"] for r in test + reference.dev + reference.train}) == 1530  # disjoint splits


def test_sinst_reads_the_11_bucket_and_keeps_every_reference(tmp_path):
    """MiniLLM/sinst holds one folder per reference-length bucket; S-NI is 11_/valid.jsonl, lists of references."""
    hub = tmp_path / "hub"
    rows = [minillm_row(i, topic=f"task{i}_title_generation", output=[f"ref {i}", f"other ref {i}"]) for i in range(3)]
    write_jsonl(hub / "sinst" / "11_" / "valid.jsonl", rows)
    write_jsonl(hub / "sinst" / "0_2" / "valid.jsonl", [minillm_row(i, output=["ok"]) for i in range(8)])
    fetch("sinst", tmp_path / "data", hub, alone=False)
    examples = load_eval_set(tmp_path / "data/instruct/sinst_test.jsonl")
    assert [e.references for e in examples] == [(f"ref {i}", f"other ref {i}") for i in range(3)]
    assert read_jsonl(tmp_path / "data/instruct/sinst_test.jsonl")[2]["topic"] == "task2_title_generation"


def test_self_inst_from_a_folder_holding_just_the_file(tmp_path):
    """`--from DIR` with one set: DIR itself may hold the hub file (here under another name: the only split)."""
    write_jsonl(tmp_path / "copy" / "self_inst.jsonl", [minillm_row(i, topic="Grammarly") for i in range(2)])
    fetch("self_inst", tmp_path / "data", tmp_path / "copy", alone=True)
    records = read_jsonl(tmp_path / "data/instruct/self_inst_test.jsonl")
    assert [sorted(r) for r in records] == [["input", "instruction", "output", "prompt", "topic"]] * 2
    assert records[1]["prompt"] == alpaca_prompt("Task 1: rewrite the text.", "text 1")
    with pytest.raises(FetchError, match=r"self_inst: no local copy of MiniLLM/self-inst under --from"):
        fetch("self_inst", tmp_path / "data", tmp_path / "copy", alone=False)


def test_unni_keeps_the_first_rows_and_drops_empty_references(caplog):
    """UnNI: MiniLLM evaluates the first 10,000 rows (here limit=3); a row with an empty reference is dropped and
    counted; a row without an instruction is an error naming the row."""
    rows = [minillm_row(0), minillm_row(1, output=""), minillm_row(2, output=["x", "y"]), minillm_row(3)]
    records = instruction_records(rows, "MiniLLM/uinst", limit=3)
    assert [r["output"] for r in records] == ["rewritten 0", ["x", "y"]]
    assert "dropped 1 rows with an empty reference (rows 1)" in caplog.text
    assert SETS["unni"].convert([minillm_row(i) for i in range(3)])["instruct/unni_test.jsonl"][2]["output"] == \
        "rewritten 2"
    with pytest.raises(DataError, match=r"MiniLLM/uinst row 1: no string field 'instruction'"):
        instruction_records([minillm_row(0), {"output": "o"}], "MiniLLM/uinst")


def test_dialogsum_reads_the_test_csv_and_asks_for_the_topic(tmp_path):
    """knkarthick/dialogsum: train/validation/test CSVs (id, dialogue, summary, topic); the test split becomes
    topic-focused summary records."""
    folder = tmp_path / "hub" / "knkarthick" / "dialogsum"  # DIR/<hub id> works as well as DIR/NAME
    folder.mkdir(parents=True)
    for split, n in (("train", 5), ("validation", 2), ("test", 3)):
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["id", "dialogue", "summary", "topic"])
            writer.writeheader()
            writer.writerows({"id": f"{split}_{i}", "dialogue": f"#Person1#: Hi {i}.\n#Person2#: Hello.",
                              "summary": f"#Person1# greets #Person2# ({split} {i}).", "topic": "greeting"}
                             for i in range(n))
    fetch("dialogsum", tmp_path / "data", tmp_path / "hub", alone=False)
    records = read_jsonl(tmp_path / "data/instruct/dialogsum_test.jsonl")
    assert [r["output"] for r in records] == [f"#Person1# greets #Person2# (test {i})." for i in range(3)]
    assert records[0]["instruction"] == DIALOGSUM_INSTRUCTION.format(topic="greeting")
    assert records[0]["prompt"] == alpaca_prompt(records[0]["instruction"], "#Person1#: Hi 0.\n#Person2#: Hello.")


def test_hh_keeps_pairs_with_equal_responses_and_rejects_broken_dialogues():
    convert = SETS["hh"].convert
    same = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"}
    assert convert([same, hh_row(1)])["preference/hh_harmless_test.jsonl"] == [same, hh_row(1)]
    with pytest.raises(DataError, match=r"row 0: the chosen dialogue has no"):
        convert([{"chosen": "no dialogue", "rejected": "\n\nHuman: q\n\nAssistant: b"}])


def test_a_hub_failure_names_the_set_the_hub_id_and_the_local_way(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FetchError, match=r"(?s)sinst: could not load MiniLLM/sinst \(data_files=11_/valid.jsonl, "
                                         r"split train\).*ConnectionError.*prefkd.data fetch sinst --from DIR"):
        load_hub(SETS["sinst"])


def test_help_lists_every_set_with_its_hub_id_and_size(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fetch", "--help"])
    text = capsys.readouterr().out
    for spec in SETS.values():
        assert f"{spec.name:<10} {spec.hub_id}" in text and spec.sizes in text


# ------------------------------------------------------------------------------------------------- resolution
def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(*overrides[:1], overrides=list(overrides[1:]))


def test_data_files_resolve_from_prefkd_data_then_prefkd_shared(tmp_path, monkeypatch):
    fetched, shared = tmp_path / "fetched", tmp_path / "shared"
    monkeypatch.setenv("PREFKD_DATA", str(fetched))
    monkeypatch.setenv("PREFKD_SHARED", str(shared))
    rel = "instruct/dolly_test.jsonl"
    assert data_file(rel) == str(fetched / rel)  # nowhere: where fetch writes it
    write_jsonl(shared / "data" / rel, [{"prompt": "p", "output": "shared"}])
    assert data_file(rel) == str(shared / "data" / rel)
    write_jsonl(fetched / rel, [{"prompt": "p", "output": "fetched"}])
    assert data_file(rel) == str(fetched / rel)
    cfg = compose("evaluate", "eval=nll")
    assert cfg.eval.sets.dolly == str(fetched / rel)
    assert cfg.eval.sets.vicuna == str(fetched / "instruct/vicuna_test.jsonl")
    assert load_eval_set(cfg.eval.sets.dolly)[0].references == ("fetched",)


@pytest.mark.parametrize("overrides, key, name", [
    (("evaluate", "eval=instruct"), "eval.sets.sinst", "sinst"),
    (("evaluate", "eval=nll"), "eval.sets.unni", "unni"),
    (("evaluate", "eval=preference"), "eval.sets.hh", "hh"),
    (("train", "dataset=hh"), "dataset.source.train", "hh"),
    (("train", "experiment=demo_table", "loss=sft"), "dataset.source.train", "dolly"),
])
def test_a_set_that_is_nowhere_says_how_to_fetch_it(tmp_path, monkeypatch, overrides, key, name):
    """Eval sets (prefkd.eval.sets), training JSONL (prefkd.data.records) and HH pairs (a .jsonl path is never taken
    for a hub id): the error names the file, the fetch command and PREFKD_SHARED."""
    from omegaconf import OmegaConf

    from prefkd.data.preference import read_pairs

    monkeypatch.setenv("PREFKD_DATA", str(tmp_path / "fetched"))
    monkeypatch.setenv("PREFKD_SHARED", str(tmp_path / "shared"))
    monkeypatch.delenv("HH_PATH", raising=False)
    path = OmegaConf.select(compose(*overrides), key)
    assert path.startswith(str(tmp_path / "fetched"))
    read = read_pairs if name == "hh" else load_eval_set
    with pytest.raises(FileNotFoundError) as err:
        read(path)
    assert f"`python -m prefkd.data fetch {name}`" in str(err.value) and "set PREFKD_SHARED" in str(err.value)


def test_every_data_file_of_the_configs_is_one_that_fetch_writes():
    """The configs name the data through ${data_file:} (never ${shared_dir:}/data), each a file of a fetchable set."""
    import re

    texts = {p: p.read_text(encoding="utf-8") for p in Path(config_dir()).rglob("*.yaml")}
    assert not [p for p, t in texts.items() if "shared_dir:}/data" in t]
    named = {m for t in texts.values() for m in re.findall(r"\$\{data_file:([^}]+)\}", t) if m != "F"}
    assert len(named) == 8 and named <= set(SET_OF_FILE), named - set(SET_OF_FILE)



@pytest.mark.parametrize("name", ["self_inst", "vicuna", "sinst", "dialogsum", "hh"])
def test_the_shared_copy_read_as_the_hub_file_converts_back_to_itself(name, shared, tmp_path):
    """The shared sets are MiniLLM's published files (and HH's test file): converting them gives the same records,
    fields included. DialogSum's shared copy is already converted: its rows are rebuilt in the hub's columns."""
    spec = SETS[name]
    (file,) = spec.files
    fields = ("chosen", "rejected") if name == "hh" else ("prompt", "output")
    records = read_jsonl(shared / "data" / file, fields)
    hub_file = tmp_path / "hub" / name / spec.load.get("data_files", "test.jsonl")
    if name == "hh":
        hub_file = tmp_path / "hub" / name / "harmless-base" / "test.jsonl"
    rows = records
    if name == "dialogsum":
        topic = len(DIALOGSUM_INSTRUCTION.split("{topic}")[0])
        rows = [{"id": f"test_{i}", "dialogue": r["input"], "summary": r["output"],
                 "topic": r["instruction"][topic:-1]} for i, r in enumerate(records)]
    write_jsonl(hub_file, rows)
    fetch(name, tmp_path / "data", tmp_path / "hub", alone=False)
    assert read_jsonl(tmp_path / "data" / file, fields) == records
