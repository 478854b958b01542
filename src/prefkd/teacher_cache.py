"""`python -m prefkd.teacher_cache model=... [teacher=...] [dataset=...] cache.dir=DIR cache.top_k=K`: run the
teacher once over the train and dev splits and store its top-k log-probabilities (``cache.store=hidden``: its last
hidden states; :mod:`prefkd.training.teacher_cache` describes the format), then train with
``trainer.teacher_cache=DIR`` without running the teacher."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from prefkd.training.schema import reported
from prefkd.training.teacher_cache import build
from prefkd.utils.config import config_dir, load_env
from prefkd.utils.devices import set_num_threads


@hydra.main(config_path=config_dir(), config_name="teacher_cache", version_base="1.3")
def main(cfg: DictConfig) -> None:
    load_env()
    with reported():
        set_num_threads(cfg.trainer.num_threads)
        out = build(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    what = f"top_k={manifest['top_k']}" if manifest["store"] == "topk" else "last hidden states"
    print(f"teacher cache: {out} ({manifest['mb']} MB, {what})")


if __name__ == "__main__":
    main()
