"""tokenize_pair on the real tokenizers and the real Dolly dev records (docs/methods.md §1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from prefkd.data.records import DataError, read_jsonl
from prefkd.data.tokenize import build_example, ensure_pad_token, tokenize_pair
from prefkd.utils.labels import IGNORE_INDEX

TOKENIZERS = ["gpt2", "qwen1.5", "mistral", "tinyllama"]


@pytest.fixture(scope="module")
def records():
    from tests.helpers.shared import shared_dir

    return read_jsonl(shared_dir() / "data/instruct/dolly_dev.jsonl")[:50]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_labels_eos_no_bos_and_round_trip(name, real_tokenizer, records):
    tok = real_tokenizer(name)
    for rec in records:
        ex = tokenize_pair(rec["prompt"], rec["output"], tok)
        prompt_ids = tok.encode(rec["prompt"], add_special_tokens=False)
        response_ids = tok.encode(rec["output"], add_special_tokens=False)
        if len(prompt_ids) > 256 or len(prompt_ids) + len(response_ids) + 1 > 512:
            continue  # truncation is tested below
        assert not ex.prompt_truncated and not ex.sequence_truncated
        assert len(ex.input_ids) == len(ex.labels) == len(prompt_ids) + len(response_ids)
        assert ex.full_ids == prompt_ids + response_ids + [tok.eos_token_id]  # no BOS anywhere, EOS last
        assert ex.labels[-1] == tok.eos_token_id and tok.eos_token_id not in ex.input_ids
        if tok.bos_token_id is not None:
            assert tok.bos_token_id not in ex.input_ids
        targets = [y for y in ex.labels if y != IGNORE_INDEX]
        assert len(targets) == len(response_ids) + 1  # response + EOS
        first = next(i for i, y in enumerate(ex.labels) if y != IGNORE_INDEX)
        assert first == len(prompt_ids) - 1 and ex.labels[first] == response_ids[0]
        assert ex.labels[:first] == [IGNORE_INDEX] * first
        assert ex.input_ids == ex.full_ids[:-1] and ex.labels[first:] == ex.full_ids[first + 1:]
        # Each model decodes its own ids back to exactly the two strings.
        assert tok.decode(ex.full_ids[:ex.prompt_length]) == rec["prompt"]
        assert tok.decode(ex.response_ids[:-1]) == rec["output"]


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_truncation(name, real_tokenizer, records):
    tok = real_tokenizer(name)
    long_prompt = records[0]["prompt"] + " word" * 400
    ex = tokenize_pair(long_prompt, "A short answer.", tok)
    answer = tok.encode("A short answer.", add_special_tokens=False)
    assert ex.prompt_truncated and not ex.sequence_truncated and ex.prompt_length == 256
    assert ex.full_ids[:256] == tok.encode(long_prompt, add_special_tokens=False)[:256]  # the first tokens kept
    assert ex.response_ids == answer + [tok.eos_token_id]

    ex = tokenize_pair(records[1]["prompt"], "word " * 700, tok)
    assert ex.sequence_truncated and not ex.prompt_truncated
    assert len(ex.full_ids) == 512 and len(ex.input_ids) == len(ex.labels) == 511
    assert ex.labels[-1] != tok.eos_token_id  # the EOS fell off with the truncated tail

    ex = tokenize_pair(long_prompt, "word " * 700, tok, max_prompt_length=16, max_length=40)
    assert ex.prompt_truncated and ex.sequence_truncated and ex.prompt_length == 16 and len(ex.input_ids) == 39
    assert sum(y != IGNORE_INDEX for y in ex.labels) == 40 - 16


def test_empty_output_is_an_error(real_tokenizer):
    tok = real_tokenizer("gpt2")
    for output in ["", "   \n"]:
        with pytest.raises(DataError, match="dolly_dev record 7: the output is empty"):
            tokenize_pair("Question?", output, tok, where="dolly_dev record 7")
    with pytest.raises(DataError, match="prompt is empty"):
        tokenize_pair("", "answer", tok)
    with pytest.raises(DataError, match="tokenises to nothing"):
        build_example([1, 2], [], eos_id=0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        build_example([1, 2], [3], eos_id=0, max_prompt_length=8, max_length=8)


def test_pad_token(shared):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(str(shared / "tokenizers/gpt2"))  # fresh: the fixture's may be padded
    assert gpt2.pad_token_id is None
    assert ensure_pad_token(gpt2) is gpt2 and gpt2.pad_token_id == gpt2.eos_token_id == 50256
    qwen = AutoTokenizer.from_pretrained(str(shared / "tokenizers/qwen1.5"))
    assert ensure_pad_token(qwen).pad_token == qwen.eos_token == "<|endoftext|>"
    with pytest.raises(DataError, match="no EOS"):
        ensure_pad_token(SimpleNamespace(eos_token_id=None, pad_token_id=None, name_or_path="toy"))
