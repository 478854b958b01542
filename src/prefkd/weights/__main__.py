"""`python -m prefkd.weights positive.path=DPO_TEACHER negative.path=REVERSE_DPO_TEACHER policy.path=STUDENT
[dataset=hh] [weights.transform=rank_based] [output=FILE]`: one weight per parent for every pair (docs/methods.md §10).

See :mod:`prefkd.weights.calculator`. The output JSONL is a preference dataset: train with
``dataset=hh dataset.source.train=FILE``. Rerun the same command to resume an interrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefkd.utils.config import config_dir, load_env
from prefkd.utils.devices import set_num_threads

log = logging.getLogger("prefkd.weights")


def run(cfg: DictConfig, run_dir: str | Path) -> Path:
    """The command's work: every key checked, the pairs read and the policy's tokenizer loaded before the two
    models; writes (or resumes) ``output`` (default ``run_dir/weights.jsonl``) and returns it."""
    from prefkd.data.preference import read_pairs
    from prefkd.models.loading import load_tokenizer
    from prefkd.training.schema import check_entry
    from prefkd.weights.calculator import compute_weights

    check_entry(cfg, "weights")
    set_num_threads(cfg.num_threads)
    src = cfg.dataset.source
    pairs = read_pairs(str(src.train), src.limit, skip_invalid=src.skip_invalid, split=src.split)
    if not pairs:
        raise ValueError(f"dataset.source.train={src.train}: no pair left to weight (limit={src.limit}, and pairs "
                         f"with empty or identical responses dropped by skip_invalid)")
    policy = cfg.policy.tokenizer_path or cfg.policy.path
    policy_tokenizer = load_tokenizer(policy) if policy else None  # before the models: a wrong path fails first
    positive, negative = instantiate(cfg.positive), instantiate(cfg.negative)
    out = Path(cfg.output or Path(run_dir) / "weights.jsonl")
    w = cfg.weights
    compute_weights(pairs, positive, negative, policy_tokenizer or positive.tokenizer, out,
                    max_length=cfg.dataset.max_length, max_prompt_length=cfg.dataset.max_prompt_length,
                    eos_parent=cfg.dataset.eos_parent, batch_size=cfg.batch_size, k=w.k, lower=w.lower, upper=w.upper,
                    transform=w.transform,
                    transform_params=OmegaConf.to_container(w.params[w.transform]) if w.transform in w.params else {},
                    seed=w.seed, per_token=w.per_token, progress=cfg.progress)
    print(f"weights: {out} ({len(pairs)} pairs)")
    return out


@hydra.main(config_path=config_dir(), config_name="weights", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from prefkd.training.schema import reported

    load_env()
    with reported():
        run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
