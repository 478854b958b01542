"""The procedural instruction dataset: determinism, disjoint splits, correct answers, the Alpaca template."""

from __future__ import annotations

import re

import pytest

from prefkd.data.embedded import FAMILIES, WORDS, all_text, embedded_splits, generate_records
from prefkd.data.splits import DataSplits

WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
              "### Input:\n{input}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_records(500, seed=3)


def _numbers(record: dict) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", record["instruction"] + " " + record["input"])]


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[,\s]+", text) if w]


def test_same_seed_same_records_different_seed_different():
    assert generate_records(100, seed=1) == generate_records(100, seed=1)
    assert generate_records(100, seed=1) != generate_records(100, seed=2)
    assert embedded_splits(seed=5, n_train=50, n_dev=10, n_test=10) == embedded_splits(seed=5, n_train=50, n_dev=10,
                                                                                        n_test=10)


def test_splits_sizes_disjoint_and_source():
    splits = embedded_splits(seed=0, n_train=600, n_dev=100, n_test=100)
    assert isinstance(splits, DataSplits)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (600, 100, 100)
    prompts = [{r["prompt"] for r in part} for part in (splits.train, splits.dev, splits.test)]
    assert [len(p) for p in prompts] == [600, 100, 100]  # no duplicates inside a split either
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert splits.source == "embedded(seed=0)"
    assert splits.train == generate_records(600, seed=0)


def test_every_family_present_and_families_filter(records):
    assert len(FAMILIES) >= 6
    assert {r["task"] for r in records} == set(FAMILIES)
    only = generate_records(20, seed=0, families=["add", "uppercase"])
    assert {r["task"] for r in only} == {"add", "uppercase"}
    with pytest.raises(ValueError, match="valid families"):
        generate_records(5, families=["nope"])
    with pytest.raises(ValueError, match="alpaca"):
        embedded_splits(prompt_template="chat")


def test_record_fields_and_alpaca_template_exact(records):
    with_input = without_input = 0
    for r in records:
        assert set(r) >= {"instruction", "input", "output", "task", "prompt"}
        assert isinstance(r["output"], str) and r["output"]
        if r["input"]:
            with_input += 1
            assert r["prompt"] == WITH_INPUT.format(instruction=r["instruction"], input=r["input"])
        else:
            without_input += 1
            assert r["prompt"] == NO_INPUT.format(instruction=r["instruction"])
    assert with_input and without_input


def test_answers_are_correct(records):
    checked = 0
    for r in records:
        task, out, nums = r["task"], r["output"], _numbers(r)
        if task == "add":
            assert int(out) == nums[0] + nums[1]
        elif task == "multiply":
            assert int(out) == nums[0] * nums[1]
        elif task == "subtract":  # "Subtract b from a" names b first; every other phrasing names a first
            a, b = (nums[1], nums[0]) if re.match(r"Subtract \d+ from \d+", r["instruction"]) else nums[:2]
            assert int(out) == a - b
        elif task == "sort_numbers":
            descending = "largest to smallest" in r["instruction"] or "descending" in r["instruction"]
            assert [int(x) for x in out.split(", ")] == sorted(nums, reverse=descending)
        elif task == "largest":
            assert int(out) == max(nums)
        elif task == "sequence":
            assert int(out) == nums[-1] + (nums[1] - nums[0])
        elif task == "reverse_words":
            assert _words(out) == _words(r["input"])[::-1]
        elif task == "alphabetical":
            assert _words(out) == sorted(_words(r["input"]))
        elif task == "uppercase":
            assert out == r["input"].upper()
        elif task == "count_letter":
            quoted = re.findall(r"'([a-z]+)'", r["instruction"])
            letter, word = quoted[0], (quoted[1] if len(quoted) > 1 else r["input"])
            assert int(out) == word.count(letter)
        else:
            continue
        checked += 1
    assert checked == len(records)


def test_word_list_and_tokenizer_text():
    assert len(WORDS) >= 200 and all(w.isalpha() and w.islower() for w in WORDS)
    texts = list(all_text(seed=0, n=50))
    assert texts[0] == WITH_INPUT and texts[1] == NO_INPUT
    assert len(texts) >= 50 and all(isinstance(t, str) and t for t in texts)


def test_chatml_template_keeps_records_and_changes_only_the_prompt():
    alpaca = embedded_splits(seed=3, n_train=20, n_dev=5, n_test=5)
    chatml = embedded_splits(seed=3, n_train=20, n_dev=5, n_test=5, prompt_template="chatml")
    for a, c in zip(alpaca.train, chatml.train):
        assert (a["instruction"], a["input"], a["output"]) == (c["instruction"], c["input"], c["output"])
        body = a["instruction"] + (f"\n\n{a['input']}" if a["input"] else "")
        assert c["prompt"] == f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    assert "template=chatml" in chatml.source
