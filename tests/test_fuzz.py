"""Fuzzing the data path with hypothesis: hostile unicode (emoji and ZWJ sequences, combining marks, whitespace
runs, control and format characters, very long words, empty-ish strings) and extreme lengths through

(a) ``prefkd.data.tokenize.tokenize_pair`` and ``DistillDataset`` (with MinED's precompute hook) on the real
    tokenizer pairs of ../shared/tokenizers and the embedded tiny pair,
(b) MinED's alignment (``MinEDAligner.align``) and DTW (``dtw_align`` against the SPEC's naive double loop),
(c) parent tokens (``response_parents`` / ``build_parents`` on real offsets, ``parent_tokens`` on random spans).

Nothing may fail except with a :class:`DataError` / ``ValueError`` that says what is wrong; results keep their
invariants. Budgets: ``PREFKD_FUZZ=ci`` (default: 50 examples per test, the file in about 20 s single-threaded)
or ``PREFKD_FUZZ=long`` (300 per test); ``pytest --hypothesis-show-statistics`` reports the cases run and the
outcomes (``event``s: DataError, prompt/sequence cut, aligned, ...).
"""

from __future__ import annotations

import os
import string
import tempfile
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prefkd.align import MinEDAligner, load_vocab_map
from prefkd.align.dtw import accumulated_cost, cost_matrix, dtw_align
from prefkd.align.parent_tokens import (
    build_parents,
    cut_positions,
    parent_index_map,
    parent_tokens,
    response_parents,
    token_offsets,
)
from prefkd.data.dataset import DistillDataset
from prefkd.data.records import DataError
from prefkd.data.tokenize import encode, tokenize_pair
from prefkd.models.tiny import tiny_tokenizer
from prefkd.utils.labels import IGNORE_INDEX
from tests.helpers.references import naive_dtw
from tests.helpers.shared import load_tokenizer, shared_dir

settings.register_profile("prefkd-fuzz-ci", max_examples=50, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("prefkd-fuzz-long", parent=settings.get_profile("prefkd-fuzz-ci"), max_examples=300)
PROFILE = settings.get_profile(f"prefkd-fuzz-{os.environ.get('PREFKD_FUZZ', 'ci')}")


def fuzz(scale: float = 1.0):
    """The profile's settings (not loaded globally: other test files keep theirs), ``scale`` × its examples."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * scale)))


# ---------------------------------------------------------------------------------------------- tokenizers
PAIRS = [("qwen1.5", "gpt2"), ("mistral", "tinyllama"), ("a", "b")]  # (teacher, student); a, b: embedded pair
NAMES = ["gpt2", "qwen1.5", "mistral", "tinyllama", "a", "b"]
PUBLISHED = {("qwen1.5", "gpt2"): "qwen_to_gpt2", ("mistral", "tinyllama"): "mistral_to_tinyllama"}


def tok(name: str):
    return tiny_tokenizer(name) if name in ("a", "b") else load_tokenizer(name)


@cache
def aligner(teacher: str, student: str) -> MinEDAligner:
    """MinED's aligner: the published vocabulary map for the real pairs, the built (cached) one for the tiny pair."""
    mapping = None
    if (teacher, student) in PUBLISHED:
        mapping = load_vocab_map(shared_dir() / "data/vocab_alignment" / PUBLISHED[teacher, student]
                                 / "tea2stu_id_mapping.json")
    return MinEDAligner(tok(teacher), tok(student), vocab_map=mapping)


# ---------------------------------------------------------------------------------------------- strategies
EMOJI = ["😀", "🎉", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "🏳️\u200d🌈", "🧑\u200d💻", "\U0001FAE0"]
WORDS = ["unbelievably", "naïve", "straße", "日本語", "Привет", "مرحبا", "שלום", "e\u0301", "ﬁ", "don't",
         "Ａｂｃ", "ǅ", "İ", "ß", "Ω", "x\u0301\u0302\u0303", "\u0301start", "<|endoftext|>", "</s>", "<unk>", "<s>",
         "▁", "Ġ", "\\u00e9", "NaN", "###"]
EMPTYISH = ["", " ", "\u200b", "\ufeff", "\x00", "\u0301", "\n\n", "\u2028", "\u3000", "\t \t", "\u200d"]
pieces = st.one_of(
    st.sampled_from(EMOJI),
    st.sampled_from(WORDS), st.sampled_from(WORDS).map(lambda w: " " + w),
    st.text(st.characters(categories=("Mn", "Me")), min_size=1, max_size=8),  # combining marks, alone or stacked
    st.text(" \t\n\r\x0b\x0c\x1c\x85\u00a0\u1680\u2000\u2028\u2029\u3000\u200b\ufeff", min_size=1, max_size=12),
    st.text(st.characters(categories=("Cc", "Cf")), min_size=1, max_size=6),  # control and format characters
    st.text(string.ascii_letters, min_size=50, max_size=600),  # a very long word
    st.sampled_from("a日😀é\u0301 ").map(lambda c: c * 300),  # one character, many times
    st.text(string.digits + ".,-", min_size=1, max_size=20),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10),  # any unicode (no lone surrogates)
)
# One text in ten is empty-ish (whitespace-only strings also come out of the pieces now and then).
texts = st.integers(0, 9).flatmap(lambda k: st.sampled_from(EMPTYISH) if k == 0 else
                                  st.lists(pieces, min_size=1, max_size=8).map("".join))
# (max_prompt_length, max_length): mostly small, so long texts are cut; sometimes invalid (a ValueError).
valid_limits = st.one_of(st.integers(1, 24).flatmap(lambda p: st.tuples(st.just(p), st.integers(p + 1, p + 40))),
                         st.tuples(st.integers(1, 300), st.integers(2, 700)).map(
                             lambda x: (min(x), max(x) + (x[0] == x[1]))))
limits = st.one_of(valid_limits, valid_limits, st.tuples(st.integers(-2, 8), st.integers(-2, 8)))


def valid(mpl: int, ml: int) -> bool:
    return ml >= 2 and 1 <= mpl < ml


# ---------------------------------------------------------------------------------------------- (a) tokenize
def check_example(ex, tokenizer, prompt: str, output: str, mpl: int, ml: int) -> None:
    """The docs/methods.md §1 rules, recomputed from the raw ids (special tokens' strings in the output are text)."""
    (p_ids,), (r_ids,) = encode(tokenizer, [prompt]), encode(tokenizer, [output], split_special_tokens=True)
    p = min(len(p_ids), mpl)
    full = (p_ids[:mpl] + r_ids + [tokenizer.eos_token_id])[:ml]
    assert ex.prompt_length == p and ex.prompt_truncated == (len(p_ids) > mpl)
    assert ex.full_ids == full and ex.sequence_truncated == (p + len(r_ids) + 1 > ml)
    assert len(ex.input_ids) == len(ex.labels) == len(full) - 1 <= ml - 1
    assert ex.labels[:p - 1] == [IGNORE_INDEX] * (p - 1)
    assert ex.labels[p - 1:] == full[p:] and IGNORE_INDEX not in ex.labels[p - 1:]
    assert ex.labels[p - 1:], "at least one response target (max_prompt_length < max_length)"
    if not ex.sequence_truncated:
        assert ex.labels[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name", NAMES)
@fuzz()
@given(prompt=texts, output=texts, lim=limits)
def test_tokenize_pair(name, prompt, output, lim):
    tokenizer, (mpl, ml) = tok(name), lim
    try:
        ex = tokenize_pair(prompt, output, tokenizer, mpl, ml, where="fuzz record 7")
    except DataError as e:
        event("DataError")
        assert "fuzz record 7" in str(e)
        (p_ids,), (r_ids,) = encode(tokenizer, [prompt]), encode(tokenizer, [output], split_special_tokens=True)
        assert not prompt.strip() or not output.strip() or not p_ids or not r_ids, str(e)
        return
    except ValueError as e:
        event("ValueError (limits)")
        assert not valid(mpl, ml) and "max_prompt_length" in str(e)
        return
    assert valid(mpl, ml), "invalid limits were accepted"
    event("prompt cut" if ex.prompt_truncated else "prompt kept")
    event("sequence cut" if ex.sequence_truncated else "sequence kept")
    check_example(ex, tokenizer, prompt, output, mpl, ml)


record = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "output": texts}),
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": texts}),  # Alpaca template
    st.fixed_dictionaries({"prompt": texts, "output": st.lists(texts, min_size=1, max_size=2)}),  # references
)


def check_mined(index: list[int], s_labels: list[int], t_labels: list[int], al: MinEDAligner) -> int:
    """MinED's output: one entry per student position; -100 or a teacher response position whose token maps to
    the student's target; aligned teacher positions never go backwards. Returns the number aligned."""
    assert len(index) == len(s_labels)
    aligned = [(j, i) for j, i in enumerate(index) if i != IGNORE_INDEX]
    for j, i in aligned:
        assert s_labels[j] != IGNORE_INDEX and 0 <= i < len(t_labels) and t_labels[i] != IGNORE_INDEX
        assert al.t2s.get(t_labels[i]) == s_labels[j]
    assert [i for _, i in aligned] == sorted(i for _, i in aligned)
    return len(aligned)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
@fuzz(0.5)
@given(records=st.lists(record, min_size=1, max_size=3), lim=valid_limits)
def test_distill_dataset_with_mined(pair, records, lim):
    """A dataset of random records: a DataError naming the record, or per record exactly tokenize_pair's ids on
    both sides and a valid MinED index; it collates; a second build loads the same from its cache."""
    (teacher, student), (mpl, ml) = pair, lim
    t_tok, s_tok, al = tok(teacher), tok(student), aligner(*pair)
    with tempfile.TemporaryDirectory() as cache:
        def build():
            return DistillDataset(records, s_tok, t_tok, max_prompt_length=mpl, max_length=ml, precompute=al,
                                  precompute_version=al.version, cache_dir=cache, source="fuzz")

        try:
            ds = build()
        except DataError as e:
            event("DataError")
            assert "fuzz record" in str(e), str(e)
            return
        again = build()
    assert again.from_cache and not ds.from_cache and len(ds) == len(again) == len(records)
    aligned = 0
    for k, (rec, ex) in enumerate(zip(ds.records, ds)):
        output = rec["output"][0] if isinstance(rec["output"], list) else rec["output"]
        for side, tokenizer, prefix in (("student", s_tok, ""), ("teacher", t_tok, "teacher_")):
            ref = tokenize_pair(rec["prompt"], output, tokenizer, mpl, ml)
            assert ex[f"{prefix}input_ids"].tolist() == ref.input_ids, (side, k)
            assert ex[f"{prefix}labels"].tolist() == ref.labels, (side, k)
        aligned += check_mined(ex["mined_teacher_index"].tolist(), ex["labels"].tolist(),
                               ex["teacher_labels"].tolist(), al)
        assert all(again[k][key].tolist() == ex[key].tolist() for key in ex)
    event("some positions aligned" if aligned else "nothing aligned")
    batch = ds.collate(list(ds), s_tok.pad_token_id, t_tok.pad_token_id)
    assert batch["mined_teacher_index"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[1] <= ml - 1 and batch["teacher_input_ids"].shape[1] <= ml - 1


# ---------------------------------------------------------------------------------------------- (b) MinED, DTW
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
@fuzz()
@given(data=st.data())
def test_mined_align_on_random_labels(pair, data):
    """Label lists straight into MinED: random ids (also out of the vocabulary and negative), random masks,
    empty sides; or the ids of a random text on both sides, where most tokens should align."""
    al = aligner(*pair)
    t_tok, s_tok = tok(pair[0]), tok(pair[1])
    if data.draw(st.booleans(), label="from text"):
        text = data.draw(texts, label="text")
        t_ids, s_ids = encode(t_tok, [text])[0], encode(s_tok, [text])[0]
        cut_t, cut_s = data.draw(st.integers(0, 3), label="teacher prompt"), data.draw(st.integers(0, 3))
        t_labels, s_labels = [IGNORE_INDEX] * cut_t + t_ids, [IGNORE_INDEX] * cut_s + s_ids
    else:
        def ids(v):
            return st.one_of(st.integers(0, v - 1), st.sampled_from([IGNORE_INDEX, -1, v, v + 10**6]))

        t_labels = data.draw(st.lists(ids(len(t_tok)), max_size=40), label="teacher labels")
        s_labels = data.draw(st.lists(ids(len(s_tok)), max_size=40), label="student labels")
    index = al.align(s_labels, t_labels)
    n = check_mined(index, s_labels, t_labels, al)
    event("aligned some" if n else "aligned none")


unicode_token = st.one_of(st.text(max_size=6), st.sampled_from(EMOJI + WORDS + EMPTYISH))


@fuzz()
@given(a=st.lists(unicode_token, max_size=14), b=st.lists(unicode_token, max_size=14))
def test_dtw_equals_the_naive_recurrence(a, b):
    path = dtw_align(a, b)
    if not a or not b:
        assert path == []
        return
    cost = cost_matrix(a, b)
    d, naive_path = naive_dtw(cost)
    assert np.array_equal(accumulated_cost(cost), d.astype(np.int64))
    assert path == naive_path
    assert path[0] == (0, 0) and path[-1] == (len(a) - 1, len(b) - 1)
    assert all((i2 - i1, j2 - j1) in ((1, 0), (0, 1), (1, 1)) for (i1, j1), (i2, j2) in zip(path, path[1:]))


# ---------------------------------------------------------------------------------------------- (c) parent tokens
def check_parents(parents, s_spans, t_spans, total: int, *, complete: bool = True) -> None:
    """Parents are consecutive from 0 (to ``total`` when ``complete``); each side's token indices appear once,
    in order, a prefix of that side's tokens; every child span lies inside its parent; with tokens on both
    sides every parent has children on both; internal boundaries are cuts of both sides."""
    if not s_spans and not t_spans or not complete and not parents:
        assert parents == [] or not complete
        return
    assert parents and parents[0].start == 0
    assert all(a.end == b.start for a, b in zip(parents, parents[1:]))
    assert all(p.start < p.end for p in parents) or total == 0  # all spans (0, 0): one empty parent
    if complete:
        assert parents[-1].end == total
    for side, spans in (("student", s_spans), ("teacher", t_spans)):
        ids = [i for p in parents for i in getattr(p, side)]
        assert ids == list(range(len(ids))) and (len(ids) == len(spans) or not complete)
        for p in parents:
            assert all(p.start <= spans[i][0] and spans[i][1] <= p.end for i in getattr(p, side)), (side, p)
        if s_spans and t_spans:
            assert all(getattr(p, side) for p in parents)
    s_cuts, t_cuts = cut_positions(s_spans), cut_positions(t_spans)
    assert all(p.start in s_cuts and p.start in t_cuts for p in parents[1:])


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
@fuzz()
@given(text=texts, budget=st.one_of(st.none(), st.integers(1, 40)), eos=st.booleans())
def test_response_parents_on_hostile_text(pair, text, budget, eos):
    t_tok, s_tok = tok(pair[0]), tok(pair[1])
    s_spans, t_spans = token_offsets(text, s_tok), token_offsets(text, t_tok)
    whole = response_parents(text, s_tok, t_tok)
    total = max([len(text)] + [e for _, e in s_spans + t_spans])
    check_parents(whole, s_spans, t_spans, total)
    event(f"{'one parent' if len(whole) == 1 else 'several parents' if whole else 'no parents'}")
    if budget is None:
        return
    cut = response_parents(text, s_tok, t_tok, max_student=budget, max_teacher=budget, eos=eos)
    body = cut[:-1] if eos else cut
    assert body == whole[:len(body)]
    assert sum(len(p.student) for p in body) <= budget - eos and sum(len(p.teacher) for p in body) <= budget - eos
    if eos:
        n_s, n_t = sum(len(p.student) for p in body), sum(len(p.teacher) for p in body)
        assert cut[-1].student == (n_s,) and cut[-1].teacher == (n_t,) and cut[-1].start == cut[-1].end
    width = sum(len(p.student) for p in cut) + 3
    index = parent_index_map(cut, width, "student", offset=1)
    assert index[0] == -1 and set(index.tolist()) <= set(range(-1, len(cut)))


span_list = st.lists(st.tuples(st.integers(-2, 30), st.integers(-2, 30)), max_size=12)
tiling = st.lists(st.integers(0, 4), max_size=12).map(
    lambda widths: [(sum(widths[:k]), sum(widths[:k + 1])) for k in range(len(widths))])  # zero-width pieces too


@fuzz(2)
@given(s=st.one_of(tiling, span_list), t=st.one_of(tiling, span_list), length=st.one_of(st.none(), st.integers(0, 40)),
       budgets=st.tuples(st.one_of(st.none(), st.integers(0, 12)), st.one_of(st.none(), st.integers(0, 12))))
def test_parent_tokens_on_random_spans(s, t, length, budgets):
    """Arbitrary spans (overlapping, zero-width, gaps, unsorted, invalid): a ValueError naming the bad spans, or
    parents with every invariant; truncation keeps a prefix of whole parents within both budgets."""
    try:
        parents = parent_tokens(s, t, length)
    except ValueError as e:
        event("ValueError (invalid spans)")
        assert "invalid token spans" in str(e) and any(a < 0 or b < a for a, b in s + t)
        return
    assert not any(a < 0 or b < a for a, b in s + t), "invalid spans were accepted"
    total = max([length or 0] + [e for _, e in s + t])
    check_parents(parents, s, t, total)
    kept = build_parents(s, t, length, max_student=budgets[0], max_teacher=budgets[1])
    assert kept == parents[:len(kept)]
    check_parents(kept, s, t, total, complete=False)
    for limit, side in zip(budgets, ("student", "teacher")):
        assert limit is None or sum(len(getattr(p, side)) for p in kept) <= limit
    event("truncated" if len(kept) < len(parents) else "whole")


# ---------------------------------------------------------------------------------------------- lone surrogates
def test_a_lone_surrogate_is_a_clear_data_error(tmp_path):
    from prefkd.data.preference import load_pairs
    from prefkd.data.records import read_jsonl

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "Say hi", "output": "hi \\ud83d"}\n')  # half an emoji, as scrapers leave them
    with pytest.raises(DataError, match=r"train.jsonl line 1: field 'output'.*surrogate"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"record 0: field 'output'.*surrogate"):
        DistillDataset([{"prompt": "Say hi", "output": "hi \ud83d"}], tok("gpt2"), use_cache=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Q", "chosen": "a \\udc00", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"record 1: field 'chosen'.*surrogate"):
        load_pairs(pairs)
