"""Preference metrics (docs/methods.md §10): DPO implicit rewards on held-out pairs, and a reward-model win rate.

For a pair (x, y_w, y_l) and a policy π with reference π_ref:

    log π(y | x) = Σ_{t ∈ response} log π(y_t | x, y_<t)        (response tokens + EOS)
    r(y)         = β · (log π(y | x) − log π_ref(y | x))          (π_ref omitted: r = β log π)
    accuracy     = mean [r(y_w) > r(y_l)]     (a tie counts as wrong, as in DPO)
    margin       = mean (r(y_w) − r(y_l))

Each model scores the response with its own tokenizer, so a reference with another vocabulary (the
teacher of PrefKD) compares log-probabilities of the same strings. Tokenisation follows the DPO
reference code: prompt and response tokenised separately without special tokens (special tokens' strings
in the response are text, as in training), EOS appended to the response; over ``max_length`` the prompt
keeps its last ``max_prompt_length`` tokens, then the response is cut.

HH format (``chosen``/``rejected`` full dialogues): the prompt is everything up to and including the
last ``"\\n\\nAssistant:"`` of the chosen dialogue. Where the rejected dialogue does not share that
prefix (4 of the 2,312 HH harmless test pairs, whose responses hold further turns), the prompt is cut
at the last ``"\\n\\nAssistant:"`` inside the common prefix. Records with a ``prompt`` field
(UltraFeedback/TIS-DPO format) are used as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefkd.data.preference import HH_SEP, PreferencePair, split_hh  # noqa: F401 (re-exported)
from prefkd.data.preference import load_pairs as _load_pairs
from prefkd.data.records import DataError
from prefkd.eval.generation import Sampling, generate
from prefkd.eval.sets import resolve_data_path
from prefkd.losses.chunked import HiddenRows
from prefkd.losses.logps import sequence_logps as token_sequence_logps
from prefkd.losses.preference import preference_metrics as pair_sums
from prefkd.models.heads import OutputHead, forward_hidden, fusable_head
from prefkd.utils.labels import IGNORE_INDEX


def load_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Held-out pairs from a JSONL file (HH or prompt/chosen/rejected; see :mod:`prefkd.data.preference`); first
    ``limit``. Pairs with equal or empty responses are kept (they count as ties, i.e. wrong)."""
    return _load_pairs(resolve_data_path(path), limit=limit, check=False)


def encode(tokenizer, prompt: str, response: str, max_length: int = 512,
           max_prompt_length: int = 256) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + response + EOS, labels -100 on the prompt; truncated as above."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # "</s>" in it is text
    r = r + [tokenizer.eos_token_id]
    if len(p) + len(r) > max_length:
        p = p[-max_prompt_length:]
        r = r[:max(max_length - len(p), 1)]
    return p + r, [IGNORE_INDEX] * len(p) + r


@torch.no_grad()
def sequence_logps(model, rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
                   head: OutputHead | None = None) -> torch.Tensor:
    """(B,) float64: Σ over label positions of log π(label_t | ids_<t) for right-padded rows. ``head``
    (:func:`~prefkd.models.heads.fusable_head`): the logits are projected per chunk of response tokens from the last
    hidden state, never B×T×V; None: the model's logits are built."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    ids, mask = ids.to(device), mask.to(device)
    if head is None:
        source = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    else:
        source = HiddenRows(forward_hidden(model, ids, mask)[:, :-1], head)
    return token_sequence_logps(source, labels[:, 1:].to(device)).double().cpu()


def response_logps(model, tokenizer, pairs: Sequence[PreferencePair], *, batch_size: int, max_length: int,
                   max_prompt_length: int, progress: bool, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,), (N,): log π(y_w | x) and log π(y_l | x) for every pair (chosen and rejected share a batch)."""
    model.eval()
    head = fusable_head(model)  # None: the logits are built
    chosen, rejected = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = pairs[start:start + batch_size]
        rows = ([encode(tokenizer, p.prompt, p.chosen, max_length, max_prompt_length) for p in batch]
                + [encode(tokenizer, p.prompt, p.rejected, max_length, max_prompt_length) for p in batch])
        lp = sequence_logps(model, rows, tokenizer.pad_token_id, head)
        chosen.append(lp[:len(batch)])
        rejected.append(lp[len(batch):])
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                       ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                       beta: float) -> dict[str, float]:
    """The docs/methods.md §10 metrics from (N,) sequence log-probs, as means over the N pairs (the training losses'
    pair sums of :func:`prefkd.losses.preference.preference_metrics` divided by N): rewards/*, logps/*."""
    zero = torch.zeros_like(policy_chosen)
    sums = pair_sums(policy_chosen, policy_rejected, zero if ref_chosen is None else ref_chosen,
                     zero if ref_rejected is None else ref_rejected, beta)
    n = len(policy_chosen)
    return {**{k: v.item() / n for k, v in sums.items()}, "n": n, "beta": beta}


def evaluate_preference(policy, policy_tokenizer, pairs: Sequence[PreferencePair], *, reference=None,
                        reference_tokenizer=None, beta: float = 0.1, batch_size: int = 4, max_length: int = 512,
                        max_prompt_length: int = 256, progress: bool = True) -> dict[str, float]:
    """Preference accuracy and reward margins of ``policy`` against ``reference`` on ``pairs``."""
    if not pairs:
        raise DataError("no preference pairs to evaluate.")
    kw = dict(batch_size=batch_size, max_length=max_length, max_prompt_length=max_prompt_length, progress=progress)
    pol = response_logps(policy, policy_tokenizer, pairs, desc="policy log-probs", **kw)
    ref = (None, None)
    if reference is not None:
        ref = response_logps(reference, reference_tokenizer or policy_tokenizer, pairs, desc="reference log-probs",
                             **kw)
    return preference_metrics(*pol, *ref, beta=beta)


@torch.no_grad()
def reward_scores(reward_model, tokenizer, texts: Sequence[str], *, batch_size: int = 4,
                  max_length: int = 1024) -> torch.Tensor:
    """(N,) scalar rewards: logits[:, 0] of a sequence-classification model (truncated on the left)."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    if getattr(reward_model.config, "pad_token_id", None) is None:
        reward_model.config.pad_token_id = tokenizer.pad_token_id
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            out.append(reward_model(**enc.to(device)).logits[:, 0].double().cpu())
    finally:
        tokenizer.truncation_side = side
    return torch.cat(out)


def reward_win_rate(policy, policy_tokenizer, reward_model, reward_tokenizer, pairs: Sequence[PreferencePair], *,
                    sampling: Sampling | None = None, batch_size: int = 4, seed: int = 10,
                    progress: bool = True) -> dict:
    """Win rate of the policy's sampled responses against the chosen ones under a reward model:
    mean [R(x, ŷ) > R(x, y_w)] + ½ mean [R(x, ŷ) = R(x, y_w)]. Prompts keep their last tokens."""
    sampling = sampling or Sampling(truncation_side="left")
    policy.eval()
    gens = generate(policy, policy_tokenizer, [p.prompt for p in pairs], sampling=sampling, batch_size=batch_size,
                    seed=seed, progress=progress, desc="policy responses")
    ours = reward_scores(reward_model, reward_tokenizer, [p.prompt + " " + g for p, g in zip(pairs, gens.texts)],
                         batch_size=batch_size)
    theirs = reward_scores(reward_model, reward_tokenizer, [p.prompt + p.chosen for p in pairs], batch_size=batch_size)
    win = (ours > theirs).double().mean() + 0.5 * (ours == theirs).double().mean()
    return {"win_rate": win.item(), "reward/policy": ours.mean().item(), "reward/chosen": theirs.mean().item(),
            "generations": gens.texts}
