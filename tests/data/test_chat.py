"""Conversations with each tokenizer's own chat template (prefkd.data.chat, issue 19).

Three templates — SmolLM2's, ChatML (Qwen1.5's own, and prefkd's default for a tokenizer without one) and a
Llama-3-style one — are written into the tokenizer configs of the real tokenizers in ../shared, saved and loaded
back as a user's would be. For every teacher/student pairing of them: each side's prompt is its own rendering of
the history, ending with its generation header; the labels are exactly the answer's characters (the same string on
both sides) and the template's end of turn; no label falls on the prompt, a BOS or a template token.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
import tempfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from prefkd.data.chat import DEFAULT_TEMPLATE, check_verbatim, conversation_records, end_of_turn_id, render_prompt
from prefkd.data.dataset import DistillDataset
from prefkd.data.preference import to_pair
from prefkd.data.preference_dataset import PreferenceDataset
from prefkd.data.records import DataError
from prefkd.data.sources import messages_splits
from prefkd.eval.generation import stop_token_ids
from prefkd.utils.labels import IGNORE_INDEX
from tests.helpers.shared import load_tokenizer

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# (tokenizer in ../shared, template written into its config or None: its own / prefkd's default)
SIDES = {"qwen1.5+own ChatML": ("qwen1.5", None), "qwen1.5+SmolLM2": ("qwen1.5", SMOLLM2),
         "tinyllama+Llama-3": ("tinyllama", LLAMA3), "gpt2+default ChatML": ("gpt2", None),
         "mistral+Llama-3": ("mistral", LLAMA3)}
HEADERS = {SMOLLM2: "<|im_start|>assistant\n", LLAMA3: "<|start_header_id|>assistant<|end_header_id|>\n\n",
           None: "<|im_start|>assistant\n"}
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Café? 2+2 🙂"},
                {"role": "assistant", "content": "Oui. 4 — 四."}, {"role": "user", "content": "And 3×3?"},
                {"role": "assistant", "content": "9 ✓"}]


def with_template(name: str, template: str | None, tmp_path=None):
    """The real tokenizer ``name`` with ``template`` written into its tokenizer config (saved, loaded back; once per
    session, as loading Qwen1.5's takes seconds)."""
    return _with_template(name, template)


@functools.cache
def _with_template(name: str, template: str | None):
    tokenizer = load_tokenizer(name)
    if template is None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)  # load_tokenizer's are shared by the session: never change them
    tokenizer.chat_template = template
    folder = Path(tempfile.mkdtemp(prefix="prefkd-chat-")) / name
    tokenizer.save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.chat_template == template
    return loaded


def labelled(ids, labels) -> list[int]:
    return [t for t in labels.tolist() if t != IGNORE_INDEX]


@pytest.mark.parametrize("student, teacher", [  # every template on each side, BOS-adding tokenizers both ways
    ("gpt2+default ChatML", "qwen1.5+SmolLM2"), ("qwen1.5+SmolLM2", "tinyllama+Llama-3"),
    ("tinyllama+Llama-3", "qwen1.5+own ChatML"), ("gpt2+default ChatML", "mistral+Llama-3"),
    ("mistral+Llama-3", "gpt2+default ChatML"), ("qwen1.5+own ChatML", "qwen1.5+SmolLM2")])
def test_each_side_renders_its_template_and_learns_the_same_answer(student, teacher, tmp_path):
    (s_name, s_template), (t_name, t_template) = SIDES[student], SIDES[teacher]
    s_tok, t_tok = with_template(s_name, s_template, tmp_path), with_template(t_name, t_template, tmp_path)
    records = conversation_records(CONVERSATION, "all")
    ds = DistillDataset(records, s_tok, t_tok, use_cache=False)
    for i, record in enumerate(ds.records):
        assert record["prompt"] == render_prompt(record["messages"], s_tok)
        assert record["teacher_prompt"] == render_prompt(record["messages"], t_tok)
        for side, tok, template, prefix in (("student", s_tok, s_template, ""), ("teacher", t_tok, t_template,
                                                                                  "teacher_")):
            prompt = record[f"{prefix}prompt"]
            assert prompt.endswith(HEADERS[template])  # a None template: its own ChatML or prefkd's, same header
            ids, labels = ds[i][f"{prefix}input_ids"], ds[i][f"{prefix}labels"]
            targets = labelled(ids, labels)
            end = ds.end_ids[side]
            assert targets[-1] == end and end not in targets[:-1]
            # the labelled tokens are exactly the answer's characters, nothing of the prompt or the template
            assert tok.decode(targets[:-1]) == record["output"], (side, tok.decode(targets))
            assert tok.bos_token_id is None or tok.bos_token_id not in targets[:-1]  # GPT-2's BOS is its EOS
            n_prompt = int((labels == IGNORE_INDEX).sum()) + 1  # the prompt's tokens: the template's, BOS included
            # (a SentencePiece tokenizer writes a word-start space after a special token: "<s> <|start_header_id|>")
            assert tok.decode(ids[:n_prompt].tolist()).replace(" ", "") == prompt.replace(" ", "")


def test_the_end_of_an_answer_is_the_templates_special_end_of_turn_else_eos(tmp_path):
    qwen = load_tokenizer("qwen1.5")
    assert end_of_turn_id(qwen) == qwen.convert_tokens_to_ids("<|im_end|>")  # its own ChatML: a special token
    smol = with_template("qwen1.5", SMOLLM2, tmp_path)
    assert end_of_turn_id(smol) == qwen.convert_tokens_to_ids("<|im_end|>")
    gpt2 = load_tokenizer("gpt2")  # no template: ChatML written as plain text, so its EOS ends the answer
    assert end_of_turn_id(gpt2) == gpt2.eos_token_id
    llama3 = with_template("tinyllama", LLAMA3, tmp_path)  # <|eot_id|> is no token of LLaMA-2's vocabulary
    assert end_of_turn_id(llama3) == llama3.eos_token_id
    assert qwen.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(None, qwen)  # generation stops there too
    assert stop_token_ids(None, gpt2) == [gpt2.eos_token_id]


def test_a_tokenizer_without_a_template_gets_chatml_said_once(caplog):
    gpt2 = copy.deepcopy(load_tokenizer("gpt2"))
    gpt2.name_or_path = "gpt2-chatml-test"  # the log line is once per tokenizer name
    with caplog.at_level(logging.INFO, logger="prefkd.data.chat"):
        DistillDataset(conversation_records(CONVERSATION, "all"), gpt2, use_cache=False)
    said = [r.getMessage() for r in caplog.records if "gpt2-chatml-test" in r.getMessage()]
    assert len(said) == 1 and "rendered with ChatML" in said[0]
    prompt = render_prompt([{"role": "user", "content": "Hi"}], gpt2)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" in DEFAULT_TEMPLATE


def test_a_template_that_rewrites_the_answer_is_refused_naming_the_example(tmp_path):
    llama3 = with_template("tinyllama", LLAMA3, tmp_path)
    history = [{"role": "user", "content": "Hi"}]
    check_verbatim(history, "Hello there", llama3, render_prompt(history, llama3), "x")
    with pytest.raises(DataError, match=re.escape("train.jsonl record 0: the chat template of")) as info:
        records = conversation_records([*history, {"role": "assistant", "content": " Hello "}], strip=False)
        DistillDataset(records, llama3, use_cache=False, source="train.jsonl")
    assert "trims the answer's surrounding whitespace" in str(info.value)
    shouting = with_template("gpt2", DEFAULT_TEMPLATE.replace("message['content']", "message['content'] | upper"),
                             tmp_path)
    with pytest.raises(DataError, match="rewrites the answer"):
        DistillDataset([{"messages": history, "output": "quiet"}], shouting, use_cache=False)


def test_conversations_become_one_record_per_answer():
    last = conversation_records(CONVERSATION, "last")
    assert last == [{"messages": CONVERSATION[:4], "output": "9 ✓"}]
    every = conversation_records(CONVERSATION, "all")
    assert [r["output"] for r in every] == ["Oui. 4 — 四.", "9 ✓"] and every[0]["messages"] == CONVERSATION[:2]
    padded = conversation_records([{"role": "user", "content": " hi \n"}, {"role": "assistant", "content": "yo\n"}])
    assert padded == [{"messages": [{"role": "user", "content": "hi"}], "output": "yo"}]
    for conversation, train_on, message in [
            (CONVERSATION[:4], "last", "ends with a 'user' turn"),
            ([{"role": "assistant", "content": "hello"}], "all", "no assistant turn follows a user turn"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "last", "is empty"),
            ([{"role": "robot", "content": "a"}], "last", "turn 0 of 'messages'"),
            (CONVERSATION, "first", "dataset.source.train_on='first'")]:
        with pytest.raises(DataError, match=re.escape(message)):
            conversation_records(conversation, train_on, where="c")


def test_messages_files_split_by_conversation(tmp_path):
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                           {"role": "user", "content": f"r{i}"}, {"role": "assistant", "content": f"b{i}"}]}
             for i in range(10)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    splits = messages_splits(str(path), dev_size=3, seed=0, train_on="all")
    assert len(splits.train) == 14 and len(splits.dev) == 6  # 7 and 3 conversations, two answers each
    train_ids = {r["output"][1:] for r in splits.train}
    assert not train_ids & {r["output"][1:] for r in splits.dev}  # no conversation in two splits
    assert splits.source == "messages(chats.jsonl,all)"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        messages_splits(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": lines[0]["messages"][:3]}) + "\n")
    with pytest.raises(DataError, match=re.escape("bad.jsonl conversation 1: the conversation ends with a 'user'")):
        messages_splits(str(tmp_path / "bad.jsonl"))


def test_preference_pairs_take_a_conversation_as_prompt(tmp_path):
    s_tok, t_tok = with_template("gpt2", None, tmp_path), with_template("tinyllama", LLAMA3, tmp_path)
    pair = to_pair({"prompt": CONVERSATION[:2], "chosen": " Yes, 4. ", "rejected": "No."}, "pairs.jsonl record 1")
    assert pair.chosen == "Yes, 4." and pair.prompt == CONVERSATION[:2]
    ds = PreferenceDataset([pair], s_tok, t_tok)
    ex = ds[0]
    for prefix, tok, end in (("", s_tok, s_tok.eos_token_id), ("teacher_", t_tok, t_tok.eos_token_id)):
        for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            targets = [t for t in ex[f"{prefix}{side}_labels"] if t != IGNORE_INDEX]
            assert tok.decode(targets[:-1]) == text and targets[-1] == end
        prompt = tok.decode(ex[f"{prefix}chosen_input_ids"][:ex[f"{prefix}chosen_labels"].count(IGNORE_INDEX) + 1])
        assert prompt.endswith(HEADERS[LLAMA3 if prefix else None])
    with pytest.raises(DataError, match=re.escape("pairs.jsonl record 2 (prompt): the history's last turn")):
        to_pair({"prompt": CONVERSATION[:3], "chosen": "a", "rejected": "b"}, "pairs.jsonl record 2")


def test_hh_dialogues_become_conversations_each_model_renders(shared):
    """dataset=hh with as_messages: each HH prompt is a conversation (Human → user, Assistant → assistant); the pairs
    and their SFT records (hh_sft) render with each model's template and end with its end of turn."""
    from prefkd.data.preference import hh_messages, preference_splits

    hh = str(shared / "data/preference/hh_harmless_test.jsonl")
    pairs = preference_splits(hh, limit=6, as_messages=True, skip_invalid=True).train
    assert all(isinstance(r["prompt"], list) and r["prompt"][-1]["role"] == "user" for r in pairs)
    assert all(r["chosen"] == r["chosen"].strip() for r in pairs)
    qwen, gpt2 = load_tokenizer("qwen1.5"), load_tokenizer("gpt2")
    ds = PreferenceDataset([to_pair(r, "hh") for r in pairs], gpt2, qwen)
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert all([t for t in ex["teacher_chosen_labels"] if t != IGNORE_INDEX][-1] == im_end for ex in ds.examples)
    sft = preference_splits(hh, limit=6, as_messages=True, as_sft=True, skip_invalid=True).train
    chat = DistillDataset(sft, gpt2, qwen, use_cache=False)
    assert all(r["teacher_prompt"].endswith("<|im_start|>assistant\n") for r in chat.records)
    assert hh_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(DataError, match="not an HH dialogue"):
        hh_messages("Question: why?\nAnswer:")
