"""The lexical cost compares token TEXTS, so byte-level and SentencePiece tokens of the same characters match."""

from __future__ import annotations

from prefkd.align.lexical import LexicalCost
from prefkd.data.dataset import DistillDataset
from prefkd.models.tiny import tiny_tokenizer


def test_newlines_and_words_match_across_tokenizer_families():
    t_tok, s_tok = tiny_tokenizer("a"), tiny_tokenizer("b")  # byte-level BPE vs SentencePiece-style
    hook = LexicalCost(t_tok, s_tok)
    record = {"prompt": "Say it:", "output": "one\ntwo three\nfour"}
    ds = DistillDataset([record], s_tok, t_tok, precompute=hook, precompute_version=hook.version, use_cache=False)
    lex = ds[0]["lex_cost"].float()
    t_ids = [int(y) for y in ds[0]["teacher_labels"] if y != -100]
    s_ids = [int(y) for y in ds[0]["labels"] if y != -100]
    assert lex.shape == (len(t_ids), len(s_ids))
    t_nl = [j for j, i in enumerate(t_ids) if t_tok.decode([i]) == "\n"]
    s_nl = [k for k, i in enumerate(s_ids) if s_tok.decode([i]) == "\n"]
    assert t_nl and s_nl and t_tok.convert_ids_to_tokens(t_ids[t_nl[0]]) != s_tok.convert_ids_to_tokens(s_ids[s_nl[0]])
    assert (lex[t_nl][:, s_nl] == 0).all()  # a newline matches a newline whatever its token spelling
    assert (lex >= 0).all() and (lex <= 1).all() and (lex > 0).any()
