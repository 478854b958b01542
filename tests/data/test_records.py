"""Records, the JSONL reader and the dataset factories, on the real Dolly dev file."""

from __future__ import annotations

import json
import re

import pytest

from prefkd.data.records import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    DataError,
    alpaca_prompt,
    read_jsonl,
    to_instruction_record,
)
from prefkd.data.sources import dolly_splits, hub_splits, jsonl_splits
from prefkd.data.splits import DataSplits


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def dolly_dev(shared):
    return shared / "data/instruct/dolly_dev.jsonl"


def test_templates_are_the_spec_text(shared):
    spec = (shared / "SPEC.md").read_text()
    with_input = re.search(r"with input: `(.+?)`\n", spec).group(1).replace("\\n", "\n")
    without = re.search(r"without: `(.+?)`\n", spec).group(1).replace("\\n", "\n")
    assert ALPACA_WITH_INPUT == with_input
    assert ALPACA_NO_INPUT == without


def test_real_dolly_prompts_are_the_alpaca_template(dolly_dev):
    records = read_jsonl(dolly_dev)
    assert len(records) == 1000
    assert all(r["prompt"] == alpaca_prompt(r["instruction"], r["input"]) for r in records)
    # Without a prompt, the template is rebuilt from instruction/input and gives the same string.
    for r in records[:50]:
        raw = {k: v for k, v in r.items() if k != "prompt"}
        assert to_instruction_record(raw, "x")["prompt"] == r["prompt"]


def test_to_instruction_record():
    rec = to_instruction_record({"instruction": "Add 2 and 3.", "input": None, "output": "5", "task": "add"}, "x")
    assert rec["prompt"] == ALPACA_NO_INPUT.format(instruction="Add 2 and 3.") and rec["task"] == "add"
    rec = to_instruction_record({"instruction": "Sum.", "input": "2 3", "output": "5"}, "x")
    assert rec["prompt"].endswith("### Input:\n2 3\n\n### Response:\n")
    assert to_instruction_record({"prompt": "P", "output": ["a", "b"]}, "x")["output"] == ["a", "b"]
    for bad, field in [({"prompt": "P"}, "'output'"), ({"output": "o"}, "'prompt'"),
                       ({"prompt": "P", "output": []}, "'output'"), ({"prompt": "P", "output": ["a", " "]}, "'output'"),
                       ({"prompt": "P", "output": 3}, "'output'"), ({"prompt": " ", "output": "o"}, "'prompt'")]:
        with pytest.raises(DataError, match=field) as e:
            to_instruction_record(bad, "where.jsonl line 7")
        assert "where.jsonl line 7" in str(e.value)


def test_read_jsonl_errors_name_field_file_line(tmp_path):
    good = {"prompt": "P", "output": "O"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, "", good, {"prompt": "P", "answer": "O"}])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "'output'" in msg and str(path) in msg and "line 4" in msg and "`output`" in msg  # field, file, line, fix

    path = write_jsonl(tmp_path / "bad.jsonl", [good, '{"prompt": "P", "output": "O"'])
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
        read_jsonl(path)

    path = write_jsonl(tmp_path / "empty_out.jsonl", [good, good, {"prompt": "P", "output": "  "}])
    with pytest.raises(DataError, match=r"empty_out\.jsonl line 3: field 'output' is empty"):
        read_jsonl(path)

    with pytest.raises(DataError, match="a JSON object"):
        read_jsonl(write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"]))
    with pytest.raises(DataError, match="no records"):
        read_jsonl(write_jsonl(tmp_path / "blank.jsonl", ["", " "]))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl.*expected a JSONL file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_read_jsonl_other_required_fields(tmp_path):
    rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}, {"prompt": "P", "chosen": "a"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2: missing field 'rejected'"):
        read_jsonl(path, required=("prompt", "chosen", "rejected"))
    assert read_jsonl(path, required=("prompt", "chosen"))[1] == rows[1]


def test_jsonl_splits_carves_a_deterministic_dev(dolly_dev, tmp_path):
    rows = [json.loads(line) for line in dolly_dev.read_text().splitlines()[:60]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    a, b = jsonl_splits(str(train), dev_size=10, seed=3), jsonl_splits(str(train), dev_size=10, seed=3)
    assert isinstance(a, DataSplits) and (len(a.train), len(a.dev), len(a.test)) == (50, 10, 0)
    assert a.dev == b.dev and a.train == b.train
    assert a.dev != jsonl_splits(str(train), dev_size=10, seed=4).dev
    assert {r["prompt"] for r in a.train}.isdisjoint(r["prompt"] for r in a.dev)
    c = jsonl_splits(str(train), dev=str(dolly_dev), test=str(train))
    assert (len(c.train), len(c.dev), len(c.test)) == (60, 1000, 60)
    with pytest.raises(DataError, match="cannot carve 60"):
        jsonl_splits(str(train), dev_size=60)


def test_jsonl_splits_concatenates_a_list_of_train_files(dolly_dev, tmp_path):
    """`dataset.source.train=[gen.jsonl,orig.jsonl]` (issue 16, SeqKD mixed with the original answers): the records
    of every file in order, a source naming them all, a carve-out from all of them; a Hydra ListConfig works."""
    from omegaconf import OmegaConf

    rows = [json.loads(line) for line in dolly_dev.read_text().splitlines()[:30]]
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": r["prompt"], "output": "teacher says " + r["output"],
                                                "reference": r["output"], "index": i} for i, r in enumerate(rows)])
    orig = write_jsonl(tmp_path / "orig.jsonl", rows[:20])
    splits = jsonl_splits(OmegaConf.create([str(gen), str(orig)]))
    assert splits.source == "jsonl(gen.jsonl+orig.jsonl)" and len(splits.train) == 50
    assert [r["output"] for r in splits.train] == [r["output"] for r in read_jsonl(gen) + read_jsonl(orig)]
    assert splits.train[0]["reference"] == rows[0]["output"]  # other fields are kept
    assert jsonl_splits([str(gen)]).train == jsonl_splits(str(gen)).train
    carved = jsonl_splits([str(gen), str(orig)], dev_size=10, seed=1)
    assert (len(carved.train), len(carved.dev)) == (40, 10)
    both = sorted(json.dumps(r, sort_keys=True) for r in carved.train + carved.dev)
    assert both == sorted(json.dumps(r, sort_keys=True) for r in splits.train)  # carved from both files
    assert carved.dev == jsonl_splits([str(gen), str(orig)], dev_size=10, seed=1).dev
    with pytest.raises(DataError, match="empty list"):
        jsonl_splits([])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        jsonl_splits([str(gen), str(tmp_path / "missing.jsonl")])


def test_hub_splits_on_a_local_json_builder(dolly_dev, tmp_path):
    splits = hub_splits("json", data_files=str(dolly_dev), dev_size=5, max_examples=30,
                        cache_dir=str(tmp_path / "hf"))
    assert (len(splits.train), len(splits.dev)) == (25, 5)
    assert all(r["prompt"].startswith("Below is an instruction") for r in splits.train)
    # Other field names: the prompt is rebuilt from instruction/context, the output read from `response`.
    rows = [{"instruction": r["instruction"], "context": r["input"], "response": r["output"]}
            for r in read_jsonl(dolly_dev)[:8]]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    splits = hub_splits("json", data_files=str(path), input_field="context", output_field="response",
                        cache_dir=str(tmp_path / "hf"))
    assert [r["prompt"] for r in splits.train] == [r["prompt"] for r in read_jsonl(dolly_dev)[:8]]
    with pytest.raises(DataError, match="output_field"):
        hub_splits("json", data_files=str(path), cache_dir=str(tmp_path / "hf"))


def test_hub_failure_says_how_to_use_local_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        hub_splits(str(tmp_path / "no-such-dataset"), cache_dir=str(tmp_path / "hf"))
    assert "dataset=jsonl dataset.source.train=" in str(e.value)


def test_dolly_splits_local_folder_and_raw_copy(dolly_dev, tmp_path):
    records = read_jsonl(dolly_dev)
    folder = tmp_path / "dolly"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", records[:40])
    write_jsonl(folder / "valid.jsonl", records[40:50])
    splits = dolly_splits(str(folder))
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (40, 10, 0)

    # A local copy of the hub repository (instruction/context/response/category rows): carved splits.
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "databricks-dolly-15k.jsonl", [{"instruction": r["instruction"], "context": r["input"],
                                                      "response": r["output"], "category": "x"} for r in records[:60]])
    a = dolly_splits(str(raw), dev_size=10, test_size=5, cache_dir=str(tmp_path / "hf"))
    assert (len(a.train), len(a.dev), len(a.test)) == (45, 10, 5)
    assert a.dev == dolly_splits(str(raw), dev_size=10, test_size=5, cache_dir=str(tmp_path / "hf")).dev
    assert {r["prompt"] for r in a.train} <= {r["prompt"] for r in records[:60]}
    # Published dev/test files replace the carve-out and are removed from train.
    dev_file = write_jsonl(tmp_path / "dev.jsonl", records[:20])
    b = dolly_splits(str(raw), dev_size=10, test_size=5, dev=str(dev_file), cache_dir=str(tmp_path / "hf"))
    assert len(b.dev) == 20 and len(b.train) == 60 - 20 - 5
    assert {r["prompt"] for r in b.train}.isdisjoint(r["prompt"] for r in records[:20])
