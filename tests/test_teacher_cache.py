"""The offline teacher cache (issue 8): with k = V, training from the cache equals training with the live teacher
(kd, and across tokenizers minedit, uld, multilevel_ot); with k < V the missing mass is explicit; mismatched data and
losses that need the teacher model are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from prefkd.training.teacher_cache import TeacherCache, build
from prefkd.utils.config import config_dir
from tests.helpers.runs import compose_cfg, quick_run

DATA = ("dataset.source.n_train=48", "dataset.source.n_dev=8", "trainer.batch_size=8", "trainer.max_steps=4",
        "trainer.num_threads=1", "trainer.log_every=2", "trainer.eval_every=1000")


def make_cache(tmp_path, *overrides, top_k=100000):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="teacher_cache", overrides=["logger=none", "trainer.device=cpu", *overrides,
                                                                f"cache.dir={tmp_path / 'cache'}",
                                                                f"cache.top_k={top_k}", "cache.progress=false",
                                                                "cache.shard_size=20"])
    return build(cfg)


@pytest.mark.parametrize("model,loss", [("tiny_same", "kd"), ("tiny", "minedit"), ("tiny", "uld"),
                                        ("tiny", "multilevel_ot")])
def test_a_full_cache_trains_exactly_like_the_live_teacher(tmp_path, model, loss):
    common = (f"model={model}", f"loss={loss}", *DATA)
    cache = make_cache(tmp_path, *common)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 3  # 48 examples, 20 per shard
    live = quick_run(compose_cfg(*common), tmp_path / "live")
    cached = quick_run(compose_cfg(*common, f"trainer.teacher_cache={cache}"), tmp_path / "cached")
    for key in ("first_train_loss", "last_train_loss", "dev_loss_final"):
        assert cached[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), key


def test_top_k_rows_keep_the_missing_mass(tmp_path):
    cache = TeacherCache(make_cache(tmp_path, "model=tiny_same", "loss=kd", *DATA, top_k=5))
    logits = cache.logits("train", [0, 3], 128, "cpu")
    lse = torch.logsumexp(logits.double(), -1)
    n0 = len(cache.rows("train", 0)[0])
    torch.testing.assert_close(lse[0, :n0], torch.zeros(n0, dtype=torch.float64), atol=1e-5, rtol=0)
    logp, index = cache.rows("train", 0)
    assert logp.shape[1] == 5 and (logp[:, :-1] >= logp[:, 1:]).all()  # sorted top-5
    row = logits[0, 0]
    rest = (1 - logp[0].double().exp().sum()) / (row.numel() - 5)
    others = torch.ones(row.numel(), dtype=torch.bool)
    others[index[0]] = False
    want = torch.full((int(others.sum()),), math.log(rest), dtype=torch.float64)
    torch.testing.assert_close(row[others].double(), want, rtol=1e-5, atol=1e-5)
    full = TeacherCache(make_cache(tmp_path / "full", "model=tiny_same", "loss=kd", *DATA))
    exact = full.logits("train", [0], 128, "cpu")[0, :n0]  # k = V: the teacher's log softmax
    top = exact.topk(5, -1)
    torch.testing.assert_close(top.values, logp, rtol=1e-5, atol=1e-6)


def test_mismatched_data_and_model_losses_are_refused(tmp_path):
    cache = make_cache(tmp_path, "model=tiny_same", "loss=kd", *DATA, top_k=8)
    with pytest.raises(ValueError, match="built for other data"):
        quick_run(compose_cfg("model=tiny_same", "loss=kd", *DATA, "dataset.source.n_train=40",
                              f"trainer.teacher_cache={cache}"), tmp_path / "a")
    with pytest.raises(ValueError, match="needs the teacher model itself"):
        quick_run(compose_cfg("model=tiny", "loss=dskd_cma", *DATA, f"trainer.teacher_cache={cache}"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="prefkd.teacher_cache"):
        TeacherCache(tmp_path / "nowhere")
