"""PreferenceDataset / collate_pairs (docs/methods.md §1 layout, §10 parents) on the real tokenizer pairs and real HH
pairs."""

from __future__ import annotations

import pytest
import torch

from prefkd.data.preference import PreferencePair, load_pairs
from prefkd.data.preference_dataset import PreferenceDataset, collate_pairs
from prefkd.data.records import DataError
from tests.helpers.shared import REAL_PAIRS


def hh(shared, n=6):
    return load_pairs(shared / "data/preference/hh_harmless_test.jsonl", limit=n, skip_invalid=True)


@pytest.mark.parametrize("teacher,student", REAL_PAIRS)
@pytest.mark.parametrize("max_length", [512, 96])
def test_parents_own_the_same_string_on_both_sides(shared, real_tokenizer, teacher, student, max_length):
    s_tok, t_tok = real_tokenizer(student), real_tokenizer(teacher)
    pairs = hh(shared)
    ds = PreferenceDataset(pairs, s_tok, t_tok, max_length=max_length, max_prompt_length=64)
    for pair, ex in zip(pairs, ds):
        for side in ("chosen", "rejected"):
            text = getattr(pair, side)
            s_lab, t_lab = torch.tensor(ex[f"{side}_labels"]), torch.tensor(ex[f"teacher_{side}_labels"])
            s_idx, t_idx = ex[f"{side}_parent_index"], ex[f"teacher_{side}_parent_index"]
            assert (len(ex[f"{side}_input_ids"]) <= max_length - 1
                    and len(ex[f"teacher_{side}_input_ids"]) <= max_length - 1)
            n = len(ex[f"{side}_weight"])
            assert s_idx.max() == t_idx.max() == n - 1  # EOS is the last parent on both sides
            assert s_lab[-1] == s_tok.eos_token_id and t_lab[-1] == t_tok.eos_token_id
            assert s_idx[-1] == t_idx[-1] == n - 1
            kept = ""
            for p in range(n - 1):  # every parent but EOS decodes to the same string on both sides
                s_str = s_tok.decode(s_lab[s_idx == p].tolist())
                t_str = t_tok.decode(t_lab[t_idx == p].tolist())
                assert s_str.strip() == t_str.strip(), (p, s_str, t_str)
                kept += s_str
            assert s_idx.ge(0).sum() + 1 == s_lab.ne(-100).sum() + 1  # every response target has a parent
            assert text.replace(" ", "").startswith(kept.replace(" ", "")[:20])
            if max_length == 512 and len(s_lab) < 400:
                whole = s_tok.decode(s_tok(text, add_special_tokens=False)["input_ids"])
                assert kept.replace(" ", "") == whole.replace(" ", "")


def test_student_only_has_one_parent_per_token_and_collates_chosen_then_rejected(shared, real_tokenizer):
    tok = real_tokenizer("gpt2")
    pairs = hh(shared, 3)
    ds = PreferenceDataset(pairs, tok, max_length=128, max_prompt_length=64)
    ex = ds[0]
    resp = torch.tensor(ex["chosen_labels"]).ne(-100)
    assert torch.equal(ex["chosen_parent_index"][resp], torch.arange(int(resp.sum())))
    batch = collate_pairs(list(ds), tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["parent_weight"].shape[0] == 6
    assert batch["input_ids"][0, :len(ex["chosen_input_ids"])].tolist() == ex["chosen_input_ids"]
    assert batch["input_ids"][3, :len(ex["rejected_input_ids"])].tolist() == ex["rejected_input_ids"]
    assert batch["labels"].shape == batch["parent_index"].shape == batch["attention_mask"].shape
    assert (batch["parent_index"][batch["labels"].eq(-100)] == -1).all()
    assert batch["parent_weight"][0].sum() == len(ex["chosen_weight"])


def test_weights_must_match_the_parents(real_tokenizer):
    s_tok, t_tok = real_tokenizer("gpt2"), real_tokenizer("qwen1.5")
    pair = PreferencePair("Question: why?", " Because unbelievably so.", " No.")
    n = len(PreferenceDataset([pair], s_tok, t_tok)[0]["chosen_weight"])
    weighted = PreferencePair(pair.prompt, pair.chosen, pair.rejected, tuple(range(n)), None)
    assert PreferenceDataset([weighted], s_tok, t_tok)[0]["chosen_weight"] == [float(i) for i in range(n)]
    bad = PreferencePair(pair.prompt, pair.chosen, pair.rejected, (1.0,) * (n + 1), None)
    with pytest.raises(DataError, match=rf"pair 1 \(chosen\): {n + 1} weights for {n} parents.*prefkd.weights"):
        PreferenceDataset([bad], s_tok, t_tok)


@pytest.mark.parametrize("max_length", [512, 80])
def test_without_an_eos_parent_eos_is_appended_but_owned_by_no_parent(shared, real_tokenizer, max_length):
    s_tok, t_tok = real_tokenizer("gpt2"), real_tokenizer("qwen1.5")
    pairs = hh(shared, 4)
    with_eos = PreferenceDataset(pairs, s_tok, t_tok, max_length=max_length, max_prompt_length=48)
    ds = PreferenceDataset(pairs, s_tok, t_tok, max_length=max_length, max_prompt_length=48, eos_parent=False)
    for ex, ref in zip(ds, with_eos):
        for side in ("chosen", "rejected"):
            for prefix, tok in (("", s_tok), ("teacher_", t_tok)):
                labels = torch.tensor(ex[f"{prefix}{side}_labels"])
                index = ex[f"{prefix}{side}_parent_index"]
                assert len(ex[f"{prefix}{side}_input_ids"]) + 1 <= max_length  # full sequence within budget
                assert labels[-1] == tok.eos_token_id and index[-1] == -1  # EOS kept, in no parent
                assert index[labels.ne(-100)][:-1].ge(0).all()  # every other response target has a parent
            n = len(ex[f"{side}_weight"])
            assert int(ex[f"{side}_parent_index"].max()) == int(ex[f"teacher_{side}_parent_index"].max()) == n - 1
            # the same parents as with an EOS parent, minus that parent, when nothing had to be cut
            if max_length == 512:
                assert n == len(ref[f"{side}_weight"]) - 1
