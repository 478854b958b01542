"""Parent-token weights from two contrastive models (docs/methods.md §10, TIS-DPO's weight estimation).

For each pair and each response, every parent p gets

    w_p = k · exp(μ · clamp(ℓ⁺_p − ℓ⁻_p, L, U)),   μ = +1 on the chosen response, −1 on the rejected one,

with ℓ^±_p the parent log-probability under π⁺ (DPO-trained) and π⁻ (trained on the reversed pairs), then one
per-response transform (origin, binary, threshold, threshold_and_scale, random, rank_based). Parents are those of
:class:`prefkd.data.preference_dataset.PreferenceDataset` between the POLICY's tokenizer (the student to train)
and the contrastive models' tokenizer, built exactly as training builds them; ``per_token=True`` gives one weight
per token instead (TIS-DPO, the policy sharing the models' tokenizer).

:func:`compute_weights` writes a JSONL of ``{prompt, chosen, rejected, chosen_weight, rejected_weight}`` records:
a preference dataset that training reads directly (``dataset=hh dataset.source.train=FILE``). It appends one
record per pair as it goes, so an interrupted run resumes after the last pair written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefkd.data.preference import PreferencePair, pairs_as_records
from prefkd.data.preference_dataset import PreferenceDataset, collate_pairs
from prefkd.losses.logps import parent_sums, token_logps
from prefkd.models.heads import fusable_head
from prefkd.training.fused_head import model_outputs
from prefkd.weights.transforms import parent_weights, transform_weights

log = logging.getLogger(__name__)


@torch.no_grad()
def parent_logps(model, batch: dict, prefix: str, num_parents: int, fused: bool = False) -> torch.Tensor:
    """2B×P parent log-probs of a :func:`collate_pairs` batch under ``model`` (``prefix`` "" or "teacher_").
    ``fused``: the model builds no logits; its head projects them per chunk (:func:`fusable_head` must
    give one)."""
    device = next(model.parameters()).device
    out = model_outputs(model, batch[f"{prefix}input_ids"].to(device), batch[f"{prefix}attention_mask"].to(device),
                        hidden=False, fused=fused)
    tok = token_logps(out.logit_source, batch[f"{prefix}labels"].to(device))
    return parent_sums(tok, batch[f"{prefix}parent_index"].to(device), num_parents).double().cpu()


def response_weights(lp_pos: torch.Tensor, lp_neg: torch.Tensor, n: int, chosen: bool, k: float, lower: float,
                     upper: float, transform: str, params: dict, generator: torch.Generator | None) -> list[float]:
    """The n weights of one response from its n parent log-probs under π⁺ and π⁻."""
    w = parent_weights(lp_pos[:n], lp_neg[:n], chosen, k=k, lower=lower, upper=upper)
    if transform == "random":
        params = {**params, "generator": generator}
    return transform_weights(w, transform, **params).tolist()


def _done(out: Path, pairs: Sequence[PreferencePair]) -> int:
    """Pairs already written to ``out`` (checked against the pairs, so a different input is not resumed)."""
    if not out.exists():
        return 0
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if i >= len(pairs) or (rec["prompt"], rec["chosen"], rec["rejected"]) != (
                pairs[i].prompt, pairs[i].chosen, pairs[i].rejected):
            raise ValueError(f"{out} holds weights for other pairs (record {i + 1} differs); write to a new file "
                             f"or delete it")
    return len(lines)


def compute_weights(pairs: Sequence[PreferencePair], positive, negative, policy_tokenizer, out: Path, *,
                    max_length: int = 512, max_prompt_length: int = 256, eos_parent: bool = True,
                    batch_size: int = 4, k: float = 1.0, lower: float = -0.5, upper: float = 1.5,
                    transform: str = "origin", transform_params: dict | None = None, seed: int = 0,
                    per_token: bool = False, fused_head: bool = True, progress: bool = True) -> Path:
    """Score every pair with π⁺ (``positive``) and π⁻ (``negative``), two ModelBundles sharing one tokenizer, and
    append one weighted record per pair to ``out`` (resuming after the records already there).

    ``per_token=False`` (PrefKD, ``loss=kd_tisdpo``): one weight per parent between the policy's and the models'
    tokenizers, exactly as training builds them (the data then has a teacher tokenizer), even when the tokenizers
    are the same. ``per_token=True`` (TIS-DPO, ``loss=tisdpo``, no teacher in the data): one weight per token; the
    policy must share the models' tokenizer. ``fused_head``: a model with a :func:`fusable_head`
    builds no B×T×V logits (they are projected per chunk)."""
    if positive.tokenizer.get_vocab() != negative.tokenizer.get_vocab():
        raise ValueError("the positive and negative models must share one tokenizer (both are fine-tuned from the "
                         "same teacher)")
    if per_token and policy_tokenizer.get_vocab() != positive.tokenizer.get_vocab():
        raise ValueError("per_token weights need the policy to share the models' tokenizer; use per_token=false "
                         "(one weight per parent, for loss=kd_tisdpo)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = _done(out, pairs)
    if start:
        log.info("resuming: %d of %d pairs already in %s", start, len(pairs), out)
    generator = torch.Generator().manual_seed(seed)
    params = dict(transform_params or {})
    prefix = "" if per_token else "teacher_"
    fused = [fused_head and fusable_head(m.model) is not None for m in (positive, negative)]
    bar = tqdm(total=len(pairs), initial=start, desc="weights", unit="pair", disable=not progress)
    with out.open("a") as f:
        for lo in range(start, len(pairs), batch_size):
            chunk = [PreferencePair(p.prompt, p.chosen, p.rejected) for p in pairs[lo:lo + batch_size]]
            ds = PreferenceDataset(chunk, policy_tokenizer, None if per_token else positive.tokenizer,
                                   max_length=max_length, max_prompt_length=max_prompt_length,
                                   eos_parent=eos_parent, source=f"pairs {lo + 1}..")
            batch = collate_pairs(list(ds), policy_tokenizer.pad_token_id,
                                  None if per_token else positive.tokenizer.pad_token_id)
            n_par = batch["parent_weight"].shape[1]
            pos, neg = (parent_logps(m.model, batch, prefix, n_par, f) for m, f in zip((positive, negative), fused))
            b = len(chunk)
            for i, (pair, ex) in enumerate(zip(chunk, ds)):
                ws = [response_weights(pos[row], neg[row], len(ex[f"{side}_weight"]), side == "chosen", k, lower,
                                       upper, transform, params, generator)
                      for side, row in (("chosen", i), ("rejected", b + i))]
                rec = pairs_as_records([PreferencePair(pair.prompt, pair.chosen, pair.rejected, *map(tuple, ws))])[0]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(b)
    bar.close()
    return out
