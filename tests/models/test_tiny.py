"""Tiny tokenizers (trained on the embedded data) and tiny / shrunk random models."""

from __future__ import annotations

import pytest
import torch

from prefkd.data.embedded import generate_records
from prefkd.models.tiny import build_shrunk, build_tiny, shrunk_config, tiny_tokenizer

SAMPLE = "Sort these numbers: 42, 7, 113.\n\n### Response:\nthe brave farmer finds a green key"


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-tokenizers")


@pytest.fixture(scope="module")
def toks(tok_cache):
    return {kind: tiny_tokenizer(kind, cache_dir=tok_cache) for kind in "ab"}


@pytest.fixture(scope="module")
def texts():
    return [r["prompt"] + r["output"] for r in generate_records(100, seed=11)]


def test_tokenizers_are_deterministic_across_trainings(toks, tmp_path, texts):
    for kind in "ab":
        again = tiny_tokenizer(kind, cache_dir=tmp_path / "other")  # a fresh training
        assert again.get_vocab() == toks[kind].get_vocab()
        for text in texts[:20]:
            ids = toks[kind](text, add_special_tokens=False).input_ids
            assert again(text, add_special_tokens=False).input_ids == ids


def test_second_call_reads_the_cache(tok_cache, toks):
    files = list(tok_cache.rglob("tokenizer.json"))
    assert len(files) == 2
    assert tiny_tokenizer("a", cache_dir=tok_cache).get_vocab() == toks["a"].get_vocab()


def test_special_tokens_and_sizes(toks):
    a, b = toks["a"], toks["b"]
    assert (len(a), len(b)) == (1024, 768)
    assert a.eos_token == "<|endoftext|>" and b.eos_token == "</s>"
    for tok in (a, b):
        assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id is not None
        ids = tok("hello world").input_ids  # even with special tokens on, no BOS/EOS is added
        assert ids == tok("hello world", add_special_tokens=False).input_ids
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert any(t.startswith("Ġ") for t in a.get_vocab()) and not any(t.startswith("▁") for t in a.get_vocab())
    assert any(t.startswith("▁") for t in b.get_vocab()) and "<0x0A>" in b.get_vocab()


@pytest.mark.parametrize("kind", ["a", "b"])
def test_offsets_cover_the_text_and_round_trip(toks, texts, kind):
    tok = toks[kind]
    for text in texts + [SAMPLE, "Unicode too: café, 你好!"]:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        covered = set()
        for start, end in enc.offset_mapping:
            assert 0 <= start <= end <= len(text)
            covered.update(range(start, end))
        assert covered == set(range(len(text)))
        ends = [end for _, end in enc.offset_mapping]
        assert ends == sorted(ends) and ends[-1] == len(text)
        assert tok.decode(enc.input_ids) == text


def test_the_two_tokenizers_segment_differently(toks):
    a = toks["a"].convert_ids_to_tokens(toks["a"](SAMPLE, add_special_tokens=False).input_ids)
    b = toks["b"].convert_ids_to_tokens(toks["b"](SAMPLE, add_special_tokens=False).input_ids)
    strip = lambda ts: [t.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n") for t in ts]  # noqa: E731
    assert strip(a) != strip(b)
    assert len(a) != len(b)


@pytest.mark.parametrize("kind,arch", [("a", "llama"), ("b", "gpt2"), ("b", "llama"), ("a", "gpt2")])
def test_tiny_model_forward(tok_cache, toks, kind, arch):
    bundle = build_tiny(kind, arch, hidden_size=32, num_layers=2, num_heads=4, cache_dir=tok_cache)
    tok, cfg = bundle.tokenizer, bundle.model.config
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    ids = tok(SAMPLE, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = bundle.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(toks[kind]))
    assert torch.isfinite(logits).all()


def test_tiny_model_seed_determinism_and_freeze(tok_cache):
    m1 = build_tiny("a", "llama", seed=3, cache_dir=tok_cache).model
    m2 = build_tiny("a", "llama", seed=3, cache_dir=tok_cache).model
    m3 = build_tiny("a", "llama", seed=4, cache_dir=tok_cache).model
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["lm_head.weight"], s3["lm_head.weight"])
    frozen = build_tiny("b", "gpt2", freeze=True, cache_dir=tok_cache).model
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="valid"):
        build_tiny("c", cache_dir=tok_cache)
    with pytest.raises(ValueError, match="valid"):
        build_tiny("a", "bert", cache_dir=tok_cache)


@pytest.mark.parametrize("name,model_type,vocab", [("gpt2", "gpt2", 50257), ("qwen1.5", "qwen2", 151936),
                                                   ("mistral", "mistral", 32000), ("tinyllama", "llama", 32000)])
def test_shrunk_real_configs_build_and_run(shared, name, model_type, vocab):
    directory = shared / "tokenizers" / name
    cfg = shrunk_config(directory / "config.json", hidden_size=32, num_layers=2, num_heads=4)
    assert cfg.model_type == model_type and cfg.vocab_size == vocab
    bundle = build_shrunk(directory, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model, tok = bundle.model, bundle.tokenizer
    assert model.config.eos_token_id == tok.eos_token_id and tok.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) < 12_000_000
    ids = tok("The quick brown fox, 42.", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], vocab)
