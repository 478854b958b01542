"""Batched left-padded generation: docs/methods.md §9 settings, reproducible seeds, prompts cut to 256 tokens."""

from __future__ import annotations

import torch

from prefkd.eval.generation import Sampling, encode_prompts, generate, left_pad

PROMPTS = ["Below is an instruction. Say something nice.", "Hi", "A third, rather longer prompt about cats and dogs",
           "Four", "Five prompts in all"]


def test_spec_defaults():
    kw = Sampling().generate_kwargs()
    assert kw["do_sample"] is True and kw["temperature"] == 1.0 and kw["top_p"] == 1.0 and kw["top_k"] == 0
    assert kw["no_repeat_ngram_size"] == 6 and kw["max_new_tokens"] == 256 and Sampling().max_prompt_length == 256


def test_prompts_cut_to_256_tokens_without_bos(tiny_tokenizer):
    long = " ".join(["word"] * 400)
    ids = encode_prompts(tiny_tokenizer, [long, "short"], 256)
    assert len(ids[0]) == 256 and ids[0] == tiny_tokenizer(long, add_special_tokens=False)["input_ids"][:256]
    assert ids[1][0] != tiny_tokenizer.bos_token_id
    full = tiny_tokenizer(long, add_special_tokens=False)["input_ids"]
    assert encode_prompts(tiny_tokenizer, [long], 4, "left")[0] == full[-4:]  # "left" keeps the last tokens
    ids_, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids_.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_same_seed_same_output_different_seed_different(tiny):
    model, tok = tiny
    s = Sampling(max_new_tokens=12)
    a = generate(model, tok, PROMPTS, sampling=s, batch_size=2, seed=10, progress=False)
    torch.rand(100)  # whatever ran before does not matter
    b = generate(model, tok, PROMPTS, sampling=s, batch_size=2, seed=10, progress=False)
    c = generate(model, tok, PROMPTS, sampling=s, batch_size=2, seed=20, progress=False)
    assert a.texts == b.texts and a.num_tokens == b.num_tokens
    assert a.texts != c.texts
    assert len(a.texts) == len(PROMPTS) and all(t == t.strip() for t in a.texts)
    assert all(0 < n <= 12 for n in a.num_tokens)


def test_generation_leaves_the_callers_rng_alone(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, tok, PROMPTS[:2], sampling=Sampling(max_new_tokens=4), seed=10, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_left_padded_batches_match_single_prompts(tiny):
    """Greedy decoding of a left-padded batch equals decoding each prompt alone."""
    model, tok = tiny
    s = Sampling(do_sample=False, max_new_tokens=8, no_repeat_ngram_size=0)
    batched = generate(model, tok, PROMPTS, sampling=s, batch_size=5, progress=False)
    single = [generate(model, tok, [p], sampling=s, batch_size=1, progress=False).texts[0] for p in PROMPTS]
    assert batched.texts == single
