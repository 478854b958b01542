"""DistillDataset (dual tokenisation, precompute, disk cache) and the collator, on real data and tokenizers."""

from __future__ import annotations

import logging

import pytest
import torch

from prefkd.data.dataset import DistillDataset, cache_key, collate, default_cache_dir, pad_value
from prefkd.data.records import DataError, read_jsonl
from prefkd.utils.labels import IGNORE_INDEX
from tests.helpers.shared import REAL_PAIRS


@pytest.fixture(scope="module")
def records():
    from tests.helpers.shared import shared_dir

    return read_jsonl(shared_dir() / "data/instruct/dolly_dev.jsonl")[:50]


def build(records, student, teacher, tmp_path, **kw):
    return DistillDataset(records, student, teacher, cache_dir=tmp_path / "cache", source="dolly_dev", **kw)


@pytest.mark.parametrize("teacher_name,student_name", REAL_PAIRS)
def test_student_and_teacher_fields_are_parallel(teacher_name, student_name, real_tokenizer, records, tmp_path):
    s_tok, t_tok = real_tokenizer(student_name), real_tokenizer(teacher_name)
    ds = build(records, s_tok, t_tok, tmp_path)
    assert len(ds) == 50 and ds.records[3]["output"] == records[3]["output"]
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(50)]
    for i in range(len(ds)):
        ex = ds[i]
        assert set(ex) == {"input_ids", "labels", "teacher_input_ids", "teacher_labels"}
        for prefix, tok in (("", s_tok), ("teacher_", t_tok)):
            ids, labels = ex[f"{prefix}input_ids"], ex[f"{prefix}labels"]
            assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
            prompt_ids = tok.encode(ds.records[i]["prompt"], add_special_tokens=False)
            if labels[-1] != tok.eos_token_id or len(prompt_ids) > 256:
                continue  # truncated (checked in test_truncation_warning)
            first = int(labels.ne(IGNORE_INDEX).nonzero()[0])
            prompt, response = ids[:first + 1].tolist(), labels[first:].tolist()
            assert labels[:first].eq(IGNORE_INDEX).all()
            assert tok.decode(prompt) == ds.records[i]["prompt"]
            assert tok.decode(response[:-1]) == ds.records[i]["output"]
            assert len(response) == len(tok.encode(ds.records[i]["output"], add_special_tokens=False)) + 1


def test_cache_hit_and_miss(real_tokenizer, records, tmp_path):
    gpt2, qwen = real_tokenizer("gpt2"), real_tokenizer("qwen1.5")
    calls = []

    def hook(record, student, teacher, s_tok, t_tok):
        calls.append(1)
        return {"n_prompt": student.prompt_length}

    recs = records[:6]
    first = build(recs, gpt2, qwen, tmp_path, precompute=hook)
    assert not first.from_cache and first.cache_path.is_file() and len(calls) == 6
    assert [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name]  # no temp files left
    again = build(recs, gpt2, qwen, tmp_path, precompute=hook)
    assert again.from_cache and len(calls) == 6  # loaded, the hook did not run
    for i in range(6):
        assert again[i].keys() == first[i].keys()
        assert all(torch.equal(again[i][k], first[i][k]) and again[i][k].dtype == first[i][k].dtype for k in again[i])

    def other_hook(record, student, teacher, s_tok, t_tok):
        return {"n_prompt": student.prompt_length}

    changed = [dict(recs[0], output=recs[0]["output"] + "!")] + recs[1:]
    base = dict(records=recs, student_tokenizer=gpt2, teacher_tokenizer=qwen, max_prompt_length=256,
                max_length=512, precompute=hook, precompute_version="1")
    keys = {cache_key(**base)}
    for change in [dict(records=changed), dict(records=recs[1:]), dict(student_tokenizer=real_tokenizer("tinyllama")),
                   dict(teacher_tokenizer=real_tokenizer("mistral")), dict(teacher_tokenizer=None),
                   dict(max_prompt_length=128), dict(max_length=256), dict(precompute=other_hook),
                   dict(precompute=None), dict(precompute_version="2")]:
        keys.add(cache_key(**{**base, **change}))
    assert len(keys) == 11  # every change misses
    assert first.key in keys
    assert not build(changed, gpt2, qwen, tmp_path, precompute=hook).from_cache
    assert not build(recs, gpt2, qwen, tmp_path, precompute=hook, max_length=300).from_cache
    assert not build(recs, gpt2, qwen, tmp_path, precompute=hook, precompute_version="2").from_cache
    # A damaged cache file is rebuilt, not trusted.
    first.cache_path.write_bytes(b"garbage")
    assert not build(recs, gpt2, qwen, tmp_path, precompute=hook).from_cache
    assert build(recs, gpt2, qwen, tmp_path, precompute=hook).from_cache


def test_default_cache_dir_and_no_cache(real_tokenizer, records, monkeypatch, tmp_path):
    monkeypatch.setenv("PREFKD_CACHE", str(tmp_path / "pc"))
    assert default_cache_dir() == tmp_path / "pc" / "data"
    ds = DistillDataset(records[:2], real_tokenizer("gpt2"))
    assert ds.cache_path.parent == tmp_path / "pc" / "data" and ds.cache_path.is_file()
    assert DistillDataset(records[:2], real_tokenizer("gpt2")).from_cache
    ds = DistillDataset(records[:2], real_tokenizer("gpt2"), cache_dir=tmp_path / "c2", use_cache=False)
    assert ds.cache_path is None and not (tmp_path / "c2").exists()


def test_truncation_warning(real_tokenizer, records, tmp_path, caplog):
    long_prompt = dict(records[0], prompt=records[0]["prompt"] + " word" * 300)
    long_output = dict(records[1], output="word " * 600)
    recs = [long_prompt, long_output, *records[2:6]]
    with caplog.at_level(logging.WARNING, logger="prefkd.data.dataset"):
        ds = build(recs, real_tokenizer("gpt2"), real_tokenizer("qwen1.5"), tmp_path)
    warnings = [r for r in caplog.records if r.name == "prefkd.data.dataset"]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "student: 1 prompts cut to 256 tokens, 1 sequences cut to 512 tokens" in msg
    assert "teacher: 1 prompts cut to 256 tokens, 1 sequences cut to 512 tokens" in msg
    assert ds.stats["prompt_truncated"] == ds.stats["sequence_truncated"] == 1
    assert ds.lengths[0] > 256 and ds.lengths[1] == 511 and max(ds.lengths) == 511
    first = int(ds[0]["labels"].ne(IGNORE_INDEX).nonzero()[0])
    assert first == 255  # the prompt was cut to 256 tokens
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefkd.data.dataset"):
        build(records[2:6], real_tokenizer("gpt2"), real_tokenizer("qwen1.5"), tmp_path)
    assert not [r for r in caplog.records if r.name == "prefkd.data.dataset"]


def test_collate_pads_dynamically_to_the_right(real_tokenizer, records, tmp_path):
    gpt2, qwen = real_tokenizer("gpt2"), real_tokenizer("qwen1.5")
    ds = build(records[:8], gpt2, qwen, tmp_path)
    examples = [ds[i] for i in range(8)]
    batch = collate(examples, gpt2.pad_token_id, qwen.pad_token_id)
    n, m = max(ds.lengths), max(len(e["teacher_input_ids"]) for e in examples)
    assert n < 512 and batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (8, n)
    assert batch["teacher_input_ids"].shape == batch["teacher_attention_mask"].shape == (8, m)
    for b, ex in enumerate(examples):
        for prefix, pad in (("", gpt2.pad_token_id), ("teacher_", qwen.pad_token_id)):
            k = len(ex[f"{prefix}input_ids"])
            ids, labels = batch[f"{prefix}input_ids"][b], batch[f"{prefix}labels"][b]
            mask = batch[f"{prefix}attention_mask"][b]
            assert torch.equal(ids[:k], ex[f"{prefix}input_ids"]) and ids[k:].eq(pad).all()
            assert torch.equal(labels[:k], ex[f"{prefix}labels"]) and labels[k:].eq(IGNORE_INDEX).all()
            assert mask[:k].eq(1).all() and mask[k:].eq(0).all() and mask.dtype == torch.long
    assert int(batch["labels"].ne(IGNORE_INDEX).sum()) == sum(int(e["labels"].ne(IGNORE_INDEX).sum()) for e in examples)
    assert collate(examples[:1], gpt2.pad_token_id, qwen.pad_token_id)["input_ids"].shape == (1, ds.lengths[0])
    with pytest.raises(ValueError, match="teacher pad id"):
        collate(examples, gpt2.pad_token_id)
    student_only = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], gpt2.pad_token_id)
    assert set(student_only) == {"input_ids", "attention_mask", "labels"}


def test_precompute_fields_are_cached_and_padded(real_tokenizer, records, tmp_path):
    gpt2, qwen = real_tokenizer("gpt2"), real_tokenizer("qwen1.5")

    def align(record, student, teacher, s_tok, t_tok):
        n = len(student.input_ids)
        return {"teacher_index": [min(i, len(teacher.input_ids) - 1) for i in range(n)],  # per student position
                "span_idx": [[i] * (1 + i % 3) for i in range(n)],  # ragged per-token lists
                "cost": torch.rand(n, len(teacher.input_ids)),  # a dense 2-D field
                "weight": [0.5] * n, "prompt_len": student.prompt_length}

    align.pad_values = {"teacher_index": -100, "span_idx": -100}  # declared; "weight" and "cost" pad with 0

    ds = build(records[:4], gpt2, qwen, tmp_path, precompute=align)
    assert ds[0]["span_idx"].shape == (ds.lengths[0], 3) and ds[0]["span_idx"][0].tolist() == [0, -100, -100]
    cached = build(records[:4], gpt2, qwen, tmp_path, precompute=align)
    assert cached.from_cache and torch.equal(cached[2]["cost"], ds[2]["cost"])
    batch = ds.collate([ds[i] for i in range(4)], gpt2.pad_token_id, qwen.pad_token_id)
    n, m = batch["input_ids"].shape[1], batch["teacher_input_ids"].shape[1]
    assert batch["teacher_index"].shape == (4, n) and batch["span_idx"].shape == (4, n, 3)
    assert batch["cost"].shape == (4, n, m) and batch["cost"].dtype == torch.float32
    assert batch["prompt_len"].tolist() == [int(ds[i]["labels"].ne(IGNORE_INDEX).nonzero()[0]) + 1 for i in range(4)]
    short = min(range(4), key=lambda i: ds.lengths[i])
    k = ds.lengths[short]
    assert batch["teacher_index"][short, k:].eq(-100).all() and batch["span_idx"][short, k:].eq(-100).all()
    assert batch["weight"][short, k:].eq(0).all() and batch["cost"][short, k:].eq(0).all()
    assert pad_value("labels") == pad_value("teacher_labels") == -100 and pad_value("x_idx") == 0  # no name rule
    assert pad_value("x_idx", {"x_idx": -1}) == -1 and pad_value("labels", {"labels": 5}) == -100
    with pytest.raises(ValueError, match="dataset.collate"):  # a precompute field needs its declared padding
        collate([ds[i] for i in range(4)], gpt2.pad_token_id, qwen.pad_token_id)

    with pytest.raises(ValueError, match="reserved"):
        build(records[:2], gpt2, qwen, tmp_path, precompute=lambda *a: {"labels": [1]})


def test_bad_records_name_the_example(real_tokenizer, records, tmp_path):
    with pytest.raises(DataError, match="dolly_dev record 1: field 'output' is empty"):
        build([records[0], dict(records[1], output=" ")], real_tokenizer("gpt2"), None, tmp_path)
    ds = build([dict(records[0], output=["first reference", "second"])], real_tokenizer("gpt2"), None, tmp_path)
    assert real_tokenizer("gpt2").decode(ds[0]["labels"][ds[0]["labels"].ne(-100)][:-1]) == "first reference"


def test_a_truncated_answer_learns_no_eos(real_tokenizer, tmp_path):
    """A record marked ``truncated`` (python -m prefkd.generate: cut by its token budget) ends on its last answer
    token on both sides; the same record unmarked ends on EOS."""
    s_tok, t_tok = real_tokenizer("gpt2"), real_tokenizer("qwen1.5")
    record = {"prompt": "Name a colour.", "output": "Blue is a colour of the"}
    ds = build([record, {**record, "truncated": True}], s_tok, t_tok, tmp_path)
    for prefix, tok in (("", s_tok), ("teacher_", t_tok)):
        ended, cut = ds[0][f"{prefix}labels"], ds[1][f"{prefix}labels"]
        answer = tok.encode(record["output"], add_special_tokens=False)
        assert ended[-1] == tok.eos_token_id and ended[-len(answer) - 1:-1].tolist() == answer
        assert cut[-len(answer):].tolist() == answer and len(cut) == len(ended) - 1
