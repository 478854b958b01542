"""Parent weights from two contrastive models (docs/methods.md §10): the formula on a hand computation, cross-tokenizer
parents that training reads back, resume after an interruption, and the CLI."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch

from prefkd.data.preference import PreferencePair, load_pairs
from prefkd.data.preference_dataset import PreferenceDataset
from prefkd.models.tiny import build_tiny
from prefkd.weights.calculator import compute_weights

PAIRS = [PreferencePair("Q: add 2 and 3.\nA:", " 5, because two plus three is five.", " 6"),
         PreferencePair("Q: reverse abc.\nA:", " cba", " abc backwards is bca"),
         PreferencePair("Q: say hi.\nA:", " hi there", " no"),
         PreferencePair("Q: count to 3.\nA:", " 1 2 3", " 1 2 4 5")]


def models(tok="a"):
    return build_tiny(tok, "llama", 32, num_layers=1, seed=1), build_tiny(tok, "llama", 32, num_layers=1, seed=2)


def token_lps(model, tok, prompt, response):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return lp[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)]


def test_same_tokenizer_weights_follow_the_formula(tmp_path):
    pos, neg = models()
    out = compute_weights(PAIRS, pos, neg, pos.tokenizer, tmp_path / "w.jsonl", batch_size=3, per_token=True,
                          progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4
    for pair, rec in zip(PAIRS, recs):
        for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
            diff = (token_lps(pos.model, pos.tokenizer, pair.prompt, getattr(pair, side))
                    - token_lps(neg.model, neg.tokenizer, pair.prompt, getattr(pair, side)))
            want = torch.exp(mu * diff.clamp(-0.5, 1.5))  # one weight per token (+ EOS), k = 1
            torch.testing.assert_close(torch.tensor(rec[f"{side}_weight"], dtype=torch.float64), want,
                                       rtol=1e-5, atol=1e-6)
    assert any(w != 1.0 for rec in recs for w in rec["chosen_weight"])


@pytest.mark.parametrize("policy_tok", ["b", "a"])
def test_parent_weights_have_one_entry_per_parent_and_train_back(tmp_path, policy_tok):
    """Per parent, as kd_tisdpo's data builds them (a teacher tokenizer present), also when the tokenizers match."""
    pos, neg = models("a")
    policy = build_tiny(policy_tok, "gpt2", 32, num_layers=1, seed=3)
    out = compute_weights(PAIRS, pos, neg, policy.tokenizer, tmp_path / "w.jsonl", transform="rank_based",
                          transform_params={"s_min": 0.5, "s_max": 1.5}, progress=False)
    pairs = load_pairs(out)
    ds = PreferenceDataset(pairs, policy.tokenizer, pos.tokenizer)  # lengths are checked here
    for pair, ex in zip(pairs, ds):
        assert len(pair.chosen_weight) == len(ex["chosen_weight"]) == int(ex["chosen_parent_index"].max()) + 1
        assert min(pair.chosen_weight) == 0.5 and max(pair.chosen_weight) == 1.5 or len(pair.chosen_weight) == 1
    with pytest.raises(ValueError, match="per_token") if policy_tok == "b" else contextlib.nullcontext():
        compute_weights(PAIRS, pos, neg, policy.tokenizer, tmp_path / "t.jsonl", per_token=True, progress=False)


def test_an_interrupted_run_resumes_and_other_pairs_are_refused(tmp_path):
    pos, neg = models()
    full = compute_weights(PAIRS, pos, neg, pos.tokenizer, tmp_path / "full.jsonl", batch_size=2, progress=False)
    part = tmp_path / "part.jsonl"
    compute_weights(PAIRS[:1], pos, neg, pos.tokenizer, part, batch_size=2, progress=False)
    compute_weights(PAIRS, pos, neg, pos.tokenizer, part, batch_size=2, progress=False)
    a, b = ([json.loads(line) for line in f.read_text().splitlines()] for f in (part, full))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):  # same records; weights equal up to padding-dependent rounding
        assert (x["prompt"], x["chosen"], x["rejected"]) == (y["prompt"], y["chosen"], y["rejected"])
        for side in ("chosen_weight", "rejected_weight"):
            torch.testing.assert_close(torch.tensor(x[side]), torch.tensor(y[side]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other pairs"):
        compute_weights(PAIRS[::-1], pos, neg, pos.tokenizer, part, progress=False)


def test_cli_writes_a_dataset(tmp_path):
    pos, neg = models()
    for name, bundle in (("pos", pos), ("neg", neg)):
        bundle.model.save_pretrained(tmp_path / name)
        bundle.tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in PAIRS))
    out = tmp_path / "weights.jsonl"
    res = subprocess.run([sys.executable, "-m", "prefkd.weights", f"positive.path={tmp_path / 'pos'}",
                          f"negative.path={tmp_path / 'neg'}", f"dataset.source.train={data}", f"output={out}",
                          "weights.transform=threshold", "device=cpu", "progress=false",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4 and all(0.5 <= w <= 2.0 for r in recs for w in r["chosen_weight"] + r["rejected_weight"])
