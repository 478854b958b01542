"""MinED's precompute hook on real Dolly records with the real tokenizer pairs (docs/methods.md §6).

The vocabulary maps here are restricted to the teacher ids that occur in the examples' teacher labels (same
code path as the full map, which takes a minute for Qwen1.5 → GPT-2): every check below only looks up those.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rapidfuzz.distance import Levenshtein

from prefkd.align import MinEDAligner, alignment_rate, build_vocab_map, strip_marker, word_start_marker
from prefkd.data.dataset import DistillDataset
from prefkd.data.records import read_jsonl
from prefkd.data.tokenize import TokenizedExample
from prefkd.utils.labels import IGNORE_INDEX
from tests.helpers.shared import REAL_PAIRS, load_tokenizer, shared_dir

N_RECORDS = 120


@pytest.fixture(scope="module")
def records():
    return read_jsonl(shared_dir() / "data/instruct/dolly_dev.jsonl")[:N_RECORDS]


@pytest.fixture(scope="module", params=REAL_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def aligned(request, records):
    """(teacher tok, student tok, aligner, dataset with the MinED field) for one real pair."""
    t_tok, s_tok = (load_tokenizer(name) for name in request.param)
    plain = DistillDataset(records, s_tok, t_tok, use_cache=False)
    t_ids = {int(y) for ex in plain for y in ex["teacher_labels"].tolist() if y != IGNORE_INDEX}
    aligner = MinEDAligner(t_tok, s_tok, vocab_map=build_vocab_map(t_tok, s_tok, teacher_ids=t_ids))
    ds = DistillDataset(records, s_tok, t_tok, precompute=aligner, precompute_version=aligner.version,
                        use_cache=False)
    return t_tok, s_tok, aligner, ds


def reference_index(s_labels, t_labels, t2s, t_tok, s_tok) -> list[int]:
    """docs/methods.md §6 written out naively: DTW by double loop over the response targets, backtrack with
    argmin([diag, up, left]), then 'exactly one teacher position and t2s[teacher token] == student token'."""
    t_marker, s_marker = word_start_marker(t_tok), word_start_marker(s_tok)
    sp = [j for j, y in enumerate(s_labels) if y != IGNORE_INDEX]
    tp = [i for i, y in enumerate(t_labels) if y != IGNORE_INDEX]
    a = [strip_marker(t, t_marker) for t in t_tok.convert_ids_to_tokens([t_labels[i] for i in tp])]
    b = [strip_marker(s, s_marker) for s in s_tok.convert_ids_to_tokens([s_labels[j] for j in sp])]
    n, m = len(a), len(b)
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0
    for i in range(n):
        for j in range(m):
            d[i + 1, j + 1] = Levenshtein.distance(a[i], b[j]) + min(d[i, j + 1], d[i + 1, j], d[i, j])
    d = d[1:, 1:]
    i, j = n - 1, m - 1
    partners = {j: [i]}
    while i > 0 or j > 0:
        move = int(np.argmin([d[i - 1, j - 1] if i and j else np.inf, d[i - 1, j] if i else np.inf,
                              d[i, j - 1] if j else np.inf]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        partners.setdefault(j, []).append(i)
    out = [IGNORE_INDEX] * len(s_labels)
    for jj, ii in partners.items():
        if len(ii) == 1 and t2s.get(t_labels[tp[ii[0]]]) == s_labels[sp[jj]]:
            out[sp[jj]] = tp[ii[0]]
    return out


def test_aligned_positions_carry_the_mapped_token(aligned):
    t_tok, s_tok, aligner, ds = aligned
    for ex in ds:
        idx, s_labels, t_labels = ex["mined_teacher_index"], ex["labels"], ex["teacher_labels"]
        assert idx.dtype == torch.long and idx.shape == s_labels.shape
        for j in torch.nonzero(idx != IGNORE_INDEX).flatten().tolist():
            i = int(idx[j])
            assert 0 <= i < len(t_labels) and t_labels[i] != IGNORE_INDEX and s_labels[j] != IGNORE_INDEX
            assert aligner.t2s[int(t_labels[i])] == int(s_labels[j])
            assert int(aligner.t2s_ids[t_labels[i]]) == int(s_labels[j])


def test_prompt_positions_are_never_aligned_and_teacher_positions_are_monotone(aligned):
    """A DTW path is monotone, so the aligned teacher positions never decrease along the student's. They may
    repeat: one teacher token ("-N") paired with several student tokens ("-", "N", "-") serves each of them
    that carries its mapped token ("-" twice): each has exactly one teacher partner, as docs/methods.md §6 asks."""
    *_, ds = aligned
    for ex in ds:
        idx = ex["mined_teacher_index"]
        assert (idx[ex["labels"] == IGNORE_INDEX] == IGNORE_INDEX).all()
        chosen = idx[idx != IGNORE_INDEX]
        assert (chosen[1:] >= chosen[:-1]).all()


def test_alignment_rate_is_high_for_the_real_pairs(aligned):
    *_, aligner, ds = aligned
    rate = alignment_rate(ds)
    assert rate > 0.7
    assert rate == pytest.approx(aligner.alignment_rate)
    assert alignment_rate(ds.collate(list(ds)[:8], 0, 0)) == pytest.approx(alignment_rate(list(ds)[:8]))


def test_equals_the_naive_reference_of_the_spec(aligned):
    t_tok, s_tok, aligner, ds = aligned
    for k in range(0, N_RECORDS, 20):
        ex = ds[k]
        want = reference_index(ex["labels"].tolist(), ex["teacher_labels"].tolist(), aligner.t2s, t_tok, s_tok)
        assert ex["mined_teacher_index"].tolist() == want


def test_collate_pads_with_ignore_index(aligned):
    *_, ds = aligned
    batch = ds.collate([ds[0], ds[1], ds[2]], 0, 0)
    idx = batch["mined_teacher_index"]
    assert idx.shape == batch["labels"].shape
    assert (idx[batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_vocabulary_tensors_of_the_pair(aligned):
    t_tok, s_tok, aligner, _ = aligned
    assert aligner.t2s_ids.shape == (len(t_tok.get_vocab()),) and aligner.s2t_ids.shape == (len(s_tok.get_vocab()),)
    for t, s in aligner.t2s.items():
        assert aligner.t2s_ids[t] == s and 0 <= aligner.s2t_ids[s] <= t  # s2t keeps the lowest teacher id
        assert aligner.t2s[int(aligner.s2t_ids[s])] == s
    unmapped = torch.ones(len(aligner.t2s_ids), dtype=torch.bool)
    unmapped[list(aligner.t2s)] = False
    assert (aligner.t2s_ids[unmapped] == -1).all()


def test_hand_made_labels():
    """Teacher targets [Hello, Ġworld, EOS] at positions 2..4, student [Hel, lo, Ġworld, EOS] at 1..4.
    DTW pairs Hel and lo both with Hello: each has one partner, but t2s[Hello] is Hel only → lo unaligned."""

    class Tok:
        def __init__(self, vocab, marker):
            self.vocab, self.marker = vocab, marker

        def get_vocab(self):
            return dict(self.vocab)

        def tokenize(self, text):
            head, *rest = text.split(" ")
            return [head] + [self.marker + w for w in rest]

    t_tok = Tok({"P": 0, "Hello": 1, "Ġworld": 2, "</s>": 3, "Ġhello": 4, "Ġthe": 5, "a": 6}, "Ġ")
    s_tok = Tok({"Q": 0, "Hel": 1, "lo": 2, "▁world": 3, "</s>": 4, "▁hello": 5, "▁the": 6, "a": 7}, "▁")
    aligner = MinEDAligner(t_tok, s_tok, vocab_map={0: 0, 1: 1, 2: 3, 3: 4})
    s_ex = TokenizedExample(input_ids=[0, 1, 2, 3, 4], labels=[-100, 1, 2, 3, 4], prompt_length=2)
    t_ex = TokenizedExample(input_ids=[0, 0, 0, 1, 2], labels=[-100, -100, 1, 2, 3], prompt_length=3)
    out = aligner({}, s_ex, t_ex, s_tok, t_tok)["mined_teacher_index"].tolist()
    assert out == [-100, 2, -100, 3, 4]
    with pytest.raises(ValueError, match="teacher"):
        aligner({}, s_ex, None, s_tok, None)


def test_tiny_embedded_pair_and_the_dataset_cache(records, tmp_path):
    """Ġ-marked byte-level teacher → ▁-marked student; the field survives the dataset's disk cache."""
    from prefkd.models.tiny import tiny_tokenizer

    t_tok, s_tok = tiny_tokenizer("a"), tiny_tokenizer("b")
    aligner = MinEDAligner(t_tok, s_tok, top_k=10)  # full map of the tiny pair, cached in $PREFKD_CACHE
    kw = dict(precompute=aligner, precompute_version=aligner.version, cache_dir=tmp_path)
    ds = DistillDataset(records[:20], s_tok, t_tok, **kw)
    again = DistillDataset(records[:20], s_tok, t_tok, **kw)
    assert aligner.top_k == 10 and 0.5 < alignment_rate(ds) <= 1
    assert again.from_cache and all(torch.equal(a["mined_teacher_index"], b["mined_teacher_index"])
                                    for a, b in zip(ds, again))
