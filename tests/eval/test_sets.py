"""Reading evaluation sets: clear errors for broken files, the real sets of shared/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prefkd.data.records import DataError
from prefkd.eval.sets import load_eval_set, select_sets


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_output_field_names_field_and_line(tmp_path):
    f = write(tmp_path / "set.jsonl", [{"prompt": "p", "output": "o"}, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"set.jsonl line 2.*'output'"):
        load_eval_set(f)


def test_missing_prompt_and_instruction(tmp_path):
    f = write(tmp_path / "set.jsonl", [{"input": "x", "output": "o"}])
    with pytest.raises(DataError, match=r"line 1.*'prompt'.*'instruction'"):
        load_eval_set(f)


@pytest.mark.parametrize("output", ["", "   ", [], ["ok", ""]])
def test_empty_reference_is_an_error(tmp_path, output):
    f = write(tmp_path / "set.jsonl", [{"prompt": "p", "output": "o"}, {"prompt": "q", "output": output}])
    with pytest.raises(DataError, match=r"line 2.*'output'"):
        load_eval_set(f)


def test_instruction_records_get_the_alpaca_prompt_and_limit(tmp_path):
    f = write(tmp_path / "mine.jsonl", [{"instruction": "Say hi", "input": "", "output": ["hi", "hello"]},
                                         {"instruction": "Add", "input": "1+1", "output": "2"}])
    examples = load_eval_set(f)
    assert examples[0].prompt.endswith("### Instruction:\nSay hi\n\n### Response:\n")
    assert examples[0].references == ("hi", "hello")
    assert "### Input:\n1+1" in examples[1].prompt and examples[1].references == ("2",)
    assert len(load_eval_set(f, limit=1)) == 1


def test_select_sets_by_name_or_path(tmp_path):
    f = write(tmp_path / "mine.jsonl", [{"prompt": "p", "output": "o"}])
    assert select_sets(["dolly", str(f)], {"dolly": "/x/dolly.jsonl"}) == {"dolly": "/x/dolly.jsonl", "mine": str(f)}
    with pytest.raises(DataError, match="unknown evaluation set 'nope'.*dolly"):
        select_sets(["nope"], {"dolly": "/x"})
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_eval_set(tmp_path / "absent.jsonl")


def test_real_sets_load(shared):
    sinst = load_eval_set(shared / "data/instruct/sinst_test.jsonl", limit=5)
    assert len(sinst) == 5 and all(len(e.references) >= 1 for e in sinst)
    for name, n in [("dolly_test", 500), ("self_inst_test", 242), ("vicuna_test", 80)]:
        examples = load_eval_set(shared / f"data/instruct/{name}.jsonl")
        assert len(examples) == n and examples[0].prompt.startswith("Below is an instruction")


def test_configured_sets_resolve_under_prefkd_data_or_shared_and_a_missing_one_says_so(tmp_path, monkeypatch):
    """The configs' ${data_file:} is $PREFKD_DATA/F, else $PREFKD_SHARED/data/F (both default under ~/.cache/prefkd),
    never a folder beside the clone; a set missing from both names the fetch command and the variable to set
    (the order itself: tests/data/test_fetch.py)."""
    from hydra import compose, initialize_config_dir

    from prefkd.utils.config import config_dir

    monkeypatch.setenv("PREFKD_SHARED", str(tmp_path))
    (tmp_path / "data/instruct").mkdir(parents=True)
    write(tmp_path / "data/instruct/vicuna_test.jsonl", [{"prompt": "p", "output": "o"}])
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval=nll"])
    assert cfg.eval.sets.vicuna == f"{tmp_path}/data/instruct/vicuna_test.jsonl"
    assert cfg.eval.sets.dolly == f"{os.environ['PREFKD_DATA']}/instruct/dolly_test.jsonl"
    with pytest.raises(FileNotFoundError, match=r"python -m prefkd.data fetch dolly`.*set PREFKD_SHARED"):
        load_eval_set(cfg.eval.sets.dolly)
    monkeypatch.delenv("PREFKD_SHARED")
    monkeypatch.delenv("PREFKD_DATA")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval=nll"])
    assert cfg.eval.sets.dolly.startswith(str(Path("~/.cache/prefkd").expanduser()))
