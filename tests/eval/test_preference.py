"""Preference metrics (docs/methods.md §10): HH splitting, a constructed case with a known answer, the CLI path."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from prefkd.eval.preference import (
    HH_SEP,
    PreferencePair,
    encode,
    evaluate_preference,
    load_pairs,
    preference_metrics,
    split_hh,
)
from prefkd.evaluate import _dataset_shorthand
from prefkd.training.evaluation import run
from prefkd.utils.config import config_dir

PROMPT = "\n\nHuman: Say a word.\n\nAssistant:"


class ShiftedUniform(nn.Module):
    """A 'language model' whose logits are δ on token K and 0 elsewhere at every position (δ = 0: uniform),
    so log π(K) = δ − log(V − 1 + e^δ) and log π(t ≠ K) = −log(V − 1 + e^δ) exactly."""

    def __init__(self, vocab: int, token: int, delta: float):
        super().__init__()
        self.vocab, self.token, self.delta = vocab, token, delta
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = self.delta
        return SimpleNamespace(logits=logits)


def test_split_hh():
    pair = split_hh(PROMPT + " yes", PROMPT + " no")
    assert pair == PreferencePair(PROMPT, " yes", " no")
    # a response holding further turns (4 HH harmless test pairs): the prompt is cut inside the common prefix
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    rejected = "\n\nHuman: a\n\nAssistant: e"
    assert split_hh(chosen, rejected) == PreferencePair("\n\nHuman: a\n\nAssistant:",
                                                        " b\n\nHuman: c\n\nAssistant: d",
                                                        " e")
    with pytest.raises(ValueError, match="Assistant"):
        split_hh("no turns here", "none")


def test_known_shift_gives_known_accuracy_and_margin(tiny_tokenizer):
    tok = tiny_tokenizer
    V, beta, delta = len(tok), 0.1, 3.0
    K = tok(" yes yes", add_special_tokens=False)["input_ids"][-1]
    pairs = [PreferencePair(PROMPT, " yes yes yes", " no no no"),   # chosen rich in K: the policy prefers it
             PreferencePair(PROMPT, " maybe", " yes yes")]          # rejected rich in K: the policy is wrong
    policy, reference = ShiftedUniform(V, K, delta), ShiftedUniform(V, K, 0.0)
    got = evaluate_preference(policy, tok, pairs, reference=reference, beta=beta, batch_size=2, progress=False)

    log_z = math.log(V - 1 + math.exp(delta))

    def reward(prompt, response):
        _, labels = encode(tok, prompt, response)
        response_ids = [t for t in labels if t != -100]
        n_k = sum(t == K for t in response_ids)
        return beta * (n_k * delta - len(response_ids) * (log_z - math.log(V)))

    margins = [reward(p.prompt, p.chosen) - reward(p.prompt, p.rejected) for p in pairs]
    assert margins[0] > 0 > margins[1]
    assert got["rewards/accuracies"] == pytest.approx(0.5)
    assert got["rewards/margins"] == pytest.approx(sum(margins) / 2, rel=1e-5)
    assert got["rewards/chosen"] == pytest.approx((reward(PROMPT, " yes yes yes") + reward(PROMPT, " maybe")) / 2,
                                                  rel=1e-5)
    only_first = evaluate_preference(policy, tok, pairs[:1], reference=reference, beta=beta, progress=False)
    assert only_first["rewards/accuracies"] == 1.0
    same = evaluate_preference(reference, tok, pairs, reference=reference, beta=beta, progress=False)
    assert same["rewards/accuracies"] == 0.0 and same["rewards/margins"] == 0.0  # ties count as wrong


def test_metrics_without_reference():
    m = preference_metrics(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -3.0]), None, None, beta=0.5)
    assert m["rewards/accuracies"] == 0.5 and m["rewards/margins"] == pytest.approx(0.5 * (1 - 2) / 2)


def test_real_hh_pairs(shared):
    pairs = load_pairs(shared / "data/preference/hh_harmless_test.jsonl")
    assert len(pairs) == 2312
    assert all(p.prompt.endswith(HH_SEP) and p.chosen != p.rejected for p in pairs[:50])


def test_preference_command_in_process(tiny_dir, tiny_tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    from tests.helpers.tiny_llama import tiny_config

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    config = tiny_config(len(tiny_tokenizer))
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    argv = _dataset_shorthand(["dataset=hh", "eval.limit=3"])
    assert argv == ["eval.dataset=hh", "eval.limit=3"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval=preference", f"model.path={tiny_dir}", f"reference.path={tiny_dir}",
                                             f"reward_model.path={rm_dir}", "eval.win_rate.max_new_tokens=3",
                                             "device=cpu", "progress=false", "logger=none", *argv])
    results = run(cfg, tmp_path / "out")
    assert results["n"] == 3 and results["rewards/accuracies"] == 0.0 and results["rewards/margins"] == 0.0
    assert 0.0 <= results["win_rate"] <= 1.0
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["rewards/margins"] == 0.0 and on_disk["data"].endswith("hh_harmless_test.jsonl")
    assert len((tmp_path / "out" / "generations.jsonl").read_text().splitlines()) == 3


def test_log_probs_from_hidden_states_equal_those_from_built_logits():
    """A model whose head is recognised is scored chunk by chunk from its last hidden state (no B×T×V logits), and
    the sequence log-probs equal those of its built logits; a model without one is scored from its logits."""
    from prefkd.eval.preference import sequence_logps
    from prefkd.models.heads import fusable_head
    from prefkd.models.tiny import build_tiny

    model = build_tiny("a", "gpt2", 32, 2, 2, seed=3, freeze=True).model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    rows = []
    for n_prompt, n_response in ((3, 5), (6, 2), (1, 9)):
        ids = torch.randint(0, vocab, (n_prompt + n_response,), generator=g).tolist()
        rows.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    head = fusable_head(model)
    assert head is not None and fusable_head(ShiftedUniform(vocab, 1, 1.0)) is None
    with torch.no_grad():
        fused, built = sequence_logps(model, rows, 0, head), sequence_logps(model, rows, 0)
    assert (built < 0).all()
    torch.testing.assert_close(fused, built, rtol=1e-6, atol=1e-5)
