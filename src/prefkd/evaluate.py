"""`python -m prefkd.evaluate model.path=P [model.adapter=A] [eval=instruct|nll|preference] [key=value ...]`.

The protocols are in :mod:`prefkd.training.evaluation` (``eval=instruct`` ROUGE-L, ``eval=nll`` held-out NLL,
``eval=preference``). A LoRA adapter is applied to its base with peft, not merged; ``model.path`` may be left out,
the base is then read from the adapter's ``adapter_config.json``. ``dataset=NAME`` is shorthand for
``eval.dataset=NAME``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from prefkd.models.loading import load_model, load_reward_model  # noqa: F401  (old `_target_`s name them here)
from prefkd.training.evaluation import run
from prefkd.training.schema import reported
from prefkd.utils.config import config_dir, load_env


def _dataset_shorthand(argv: list[str]) -> list[str]:
    """``dataset=X`` -> ``eval.dataset=X``: config/dataset is the training data group, unused here."""
    return [f"eval.{a}" if a.startswith("dataset=") else a for a in argv]


@hydra.main(config_path=config_dir(), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    load_env()
    with reported():
        run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    sys.argv = _dataset_shorthand(sys.argv)
    main()
