"""`python -m prefkd.reference_logps model.path=REF dataset.source.train=pairs.jsonl output=FILE`: precompute
log π_ref(y_w | x) and log π_ref(y_l | x) for every pair, so DPO/IPO train with ``loss.reference=precomputed`` and
no reference model in memory.

The responses are tokenised exactly as training will (:class:`prefkd.data.preference_dataset.PreferenceDataset`
with the dataset's ``max_length``, ``max_prompt_length`` and ``eos_parent``), so train with the same dataset
settings and a policy that shares the reference's tokenizer. Writes the pairs with ``reference_chosen_logps`` and
``reference_rejected_logps`` added, one JSON line per pair, appended as it goes (rerun to resume).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from prefkd.utils.config import config_dir, load_env


@torch.no_grad()
def compute_reference_logps(pairs, reference, out: Path, *, max_length: int = 512, max_prompt_length: int = 256,
                            eos_parent: bool = True, batch_size: int = 4, fused_head: bool = True,
                            progress: bool = True) -> Path:
    """Append one record per pair with its reference sequence log-probs to ``out`` (resuming after those there).
    ``fused_head``: a reference whose head :func:`prefkd.models.heads.fusable_head` builds no B×T×V logits (its
    head projects them per chunk)."""
    from prefkd.data.preference import PreferencePair, pairs_as_records
    from prefkd.data.preference_dataset import PreferenceDataset, collate_pairs
    from prefkd.losses.logps import sequence_logps
    from prefkd.models.heads import fusable_head
    from prefkd.training.fused_head import model_outputs

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = len([line for line in out.read_text().splitlines() if line.strip()]) if out.exists() else 0
    device = next(reference.model.parameters()).device
    tok = reference.tokenizer
    fused = fused_head and fusable_head(reference.model) is not None
    with out.open("a") as f:
        for lo in tqdm(range(start, len(pairs), batch_size), desc="reference log-probs", disable=not progress):
            chunk = pairs[lo:lo + batch_size]
            ds = PreferenceDataset(chunk, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                                   eos_parent=eos_parent, source=f"pairs {lo + 1}..")
            batch = collate_pairs(list(ds), tok.pad_token_id)
            ref = model_outputs(reference.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                hidden=False, fused=fused)
            lp = sequence_logps(ref.logit_source, batch["labels"].to(device)).double().cpu()
            b = len(chunk)
            for i, p in enumerate(chunk):
                rec = pairs_as_records([PreferencePair(p.prompt, p.chosen, p.rejected, p.chosen_weight,
                                                       p.rejected_weight, (float(lp[i]), float(lp[b + i])))])[0]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
    return out


def run(cfg: DictConfig, run_dir: str | Path) -> Path:
    """The command's work: every key checked and the pairs read before the model loads; writes (or resumes)
    ``output`` (default ``run_dir/reference_logps.jsonl``) and returns it."""
    from prefkd.data.preference import read_pairs
    from prefkd.training.schema import check_entry

    check_entry(cfg, "reference_logps")
    src = cfg.dataset.source
    pairs = read_pairs(str(src.train), src.limit, skip_invalid=src.skip_invalid, split=src.split)
    if not pairs:
        raise ValueError(f"dataset.source.train={src.train}: no pair left to score (limit={src.limit}, and pairs with "
                         f"empty or identical responses dropped by skip_invalid)")
    out = Path(cfg.output or Path(run_dir) / "reference_logps.jsonl")
    compute_reference_logps(pairs, instantiate(cfg.model), out, max_length=cfg.dataset.max_length,
                            max_prompt_length=cfg.dataset.max_prompt_length, eos_parent=cfg.dataset.eos_parent,
                            batch_size=cfg.batch_size, progress=cfg.progress)
    print(f"reference log-probs: {out} ({len(pairs)} pairs)")
    return out


@hydra.main(config_path=config_dir(), config_name="reference_logps", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from prefkd.training.schema import reported

    load_env()
    with reported():
        run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
