"""`python -m prefkd.teacher_cache model=... [teacher=...] [dataset=...] cache.dir=DIR cache.top_k=K`: run the
teacher once over the train and dev splits and store its top-k log-probabilities (:mod:`prefkd.training.teacher_cache`
describes the format), then train with ``trainer.teacher_cache=DIR`` and no teacher in memory."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from prefkd.training.teacher_cache import build
from prefkd.utils.config import config_dir, load_env
from prefkd.utils.devices import set_num_threads


@hydra.main(config_path=config_dir(), config_name="teacher_cache", version_base="1.3")
def main(cfg: DictConfig) -> None:
    load_env()
    set_num_threads(cfg.trainer.num_threads)
    out = build(cfg)
    size = json.loads((out / "manifest.json").read_text())["mb"]
    print(f"teacher cache: {out} ({size} MB, top_k={cfg.cache.top_k})")


if __name__ == "__main__":
    main()
