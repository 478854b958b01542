"""`python -m prefkd.train [group=option ...] [key=value ...]`: config → models → data → trainer → checkpoint.

With no overrides it runs the demo (``make demo``). Config groups live in the repository's ``config/`` (or
``PREFKD_CONFIG_DIR``); ``--config-dir DIR`` adds a user's own groups. The run itself is
:func:`prefkd.training.pipeline.run`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import prefkd.training.run_info  # noqa: F401  (registers ${prefkd_job_subdir:...}, used by hydra.sweep.subdir)
from prefkd.training.pipeline import check_sweep_direction, objective, pass_signal_on, run
from prefkd.training.schema import reported
from prefkd.training.trainer import PREEMPT_EXIT_CODE, NonFiniteLossError, Preempted
from prefkd.utils.config import config_dir, load_env


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    load_env()
    hydra_cfg = HydraConfig.get()
    check_sweep_direction(cfg, hydra_cfg)
    try:
        with reported():
            return objective(run(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg))
    except Preempted as stop:
        pass_signal_on(stop)
        print(f"{stop}: exiting with code {PREEMPT_EXIT_CODE}; rerun the same command to resume", file=sys.stderr)
        sys.exit(PREEMPT_EXIT_CODE)
    except NonFiniteLossError as stop:
        print(f"NonFiniteLossError: {stop}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
