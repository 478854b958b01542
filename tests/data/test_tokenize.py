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


SPECIAL_TEXT = "x<s>y</s>z <|endoftext|> <unk> <|im_start|>"  # the strings of BOS, EOS and other special tokens


@pytest.mark.parametrize("name", TOKENIZERS)
def test_special_tokens_strings_in_a_response_are_text(name, real_tokenizer, tmp_path):
    """Regression (issue 19): "</s>" in an answer became an EOS label mid-response on TinyLLaMA/Mistral ("<s>" a
    BOS label), "<|endoftext|>" on GPT-2/Qwen1.5. Every path that tokenises a response takes them as text; the
    prompt (already templated) keeps its special tokens."""
    from prefkd.align.parent_tokens import token_offsets
    from prefkd.data.dataset import DistillDataset
    from prefkd.data.preference import PreferencePair
    from prefkd.data.preference_dataset import PreferenceDataset
    from prefkd.eval.preference import encode as preference_encode

    tok = real_tokenizer(name)
    specials = set(tok.all_special_ids)
    text_ids = tok(SPECIAL_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not specials & set(text_ids) and tok.decode(text_ids).replace("▁", " ").lstrip() == SPECIAL_TEXT
    eos = [tok.eos_token_id]
    ex = tokenize_pair("Question?", SPECIAL_TEXT, tok)
    assert ex.response_ids == text_ids + eos
    ds = DistillDataset([{"prompt": "Question?", "output": SPECIAL_TEXT}], tok, tok, use_cache=False)
    for key in ("labels", "teacher_labels"):
        assert [y for y in ds[0][key].tolist() if y != IGNORE_INDEX] == text_ids + eos
    assert len(token_offsets(SPECIAL_TEXT, tok)) == len(text_ids)
    pair = PreferenceDataset([PreferencePair("Question?", SPECIAL_TEXT, "no")], tok, tok)[0]
    for key in ("chosen_labels", "teacher_chosen_labels"):
        assert [y for y in pair[key] if y != IGNORE_INDEX] == text_ids + eos
    assert [y for y in preference_encode(tok, "Question?", SPECIAL_TEXT)[1] if y != IGNORE_INDEX] == text_ids + eos
    # A templated prompt keeps its special tokens (Qwen1.5's chat markers are special tokens of its vocabulary).
    chat = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenize_pair(chat, "Hello", tok).full_ids[:2] == tok(chat, add_special_tokens=False)["input_ids"][:2]
    if name == "qwen1.5":
        assert tokenize_pair(chat, "Hello", tok).full_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
