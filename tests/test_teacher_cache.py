"""The offline teacher cache (issue 8): with k = V, training from the cache equals training with the live teacher
(kd, and across tokenizers minedit, uld, multilevel_ot); with k < V the missing mass is explicit; a hidden-state cache
trains every distillation loss like the live teacher; mismatched data and losses that need the teacher model are
refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from prefkd.training.teacher_cache import TeacherCache, build, check_head
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


# MCW-KD's Sinkhorn amplifies float noise: a 1e-7 relative change of the teacher's hidden states (the cache's batches
# are padded otherwise than the run's) moves its loss by ~6e-6 relative, ~1e-4 after a few updates. Step 1 is exact.
@pytest.mark.parametrize("model,loss,later", [("tiny", "dskd_cma", 1e-5), ("tiny", "mcw_kd", 1e-3),
                                              ("tiny", "uld", 1e-5), ("tiny_same", "kd", 1e-5)])
def test_a_hidden_state_cache_trains_like_the_live_teacher(tmp_path, model, loss, later):
    """cache.store=hidden: one cache, built with another loss's data pipeline (the key covers the token ids only),
    trains every loss, those reading the teacher's hidden states included, like the live teacher."""
    common = (f"model={model}", f"loss={loss}", *DATA)
    cache = make_cache(tmp_path, f"model={model}", "loss=sft" if model == "tiny_same" else "loss=minedit", *DATA,
                       "cache.store=hidden")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["store"] == "hidden" and manifest["top_k"] is None
    live = quick_run(compose_cfg(*common), tmp_path / "live")
    cached = quick_run(compose_cfg(*common, f"trainer.teacher_cache={cache}"), tmp_path / "cached")
    assert cached["fused_head"] == live["fused_head"]  # the cached teacher hands hidden states and head, as live
    assert cached["fused_head"]["teacher"]
    assert cached["first_train_loss"] == pytest.approx(live["first_train_loss"], rel=1e-5, abs=1e-6)
    for key in ("last_train_loss", "dev_loss_final"):
        assert cached[key] == pytest.approx(live[key], rel=later, abs=1e-6), key


def test_hidden_rows_are_the_teacher_last_hidden_states(tmp_path):
    """The cached rows of an example are the live teacher's hidden_states[-1] at its positions; padding is 0; a
    model whose logits are not head(h) is refused when the cache is built."""
    from hydra.utils import instantiate

    from prefkd.training.datasets import build_datasets
    from prefkd.training.teacher_placement import split_teacher_config

    common = ("model=tiny", "loss=dskd_cma", *DATA)
    cache = TeacherCache(make_cache(tmp_path, *common, "cache.store=hidden"))
    cfg = compose_cfg(*common)
    teacher_cfg = split_teacher_config(cfg.teacher)[0]  # the model's own keys (no teacher.shard / offload)
    loss, student, teacher = instantiate(cfg.loss), instantiate(cfg.student), instantiate(teacher_cfg)
    loss.setup(student.tokenizer, teacher.tokenizer)
    train, _ = build_datasets(cfg, instantiate(cfg.dataset.source), student, teacher, loss)
    batch = train.collate([train[i] for i in (2, 5)], student.tokenizer.pad_token_id,
                          teacher.tokenizer.pad_token_id)
    m = batch["teacher_input_ids"].shape[1]
    with torch.no_grad():
        live = teacher.model.eval()(input_ids=batch["teacher_input_ids"],
                                    attention_mask=batch["teacher_attention_mask"], output_hidden_states=True)
    out = cache.outputs("train", [2, 5], m, "cpu", teacher.model)
    mask = batch["teacher_attention_mask"].bool()
    torch.testing.assert_close(out.hidden[mask], live.hidden_states[-1][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[mask], live.logits[mask], rtol=1e-4, atol=1e-4)
    assert (out.hidden[~mask] == 0).all() and out.model is teacher.model
    fused = cache.outputs("train", [2, 5], m, "cpu", teacher.model, fused=True)  # no logits: hidden states and head
    assert fused.logits is None and fused.head.weight is teacher.model.get_output_embeddings().weight
    torch.testing.assert_close(fused.logit_source[mask], live.logits[mask], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cache.store=topk"):
        check_head(teacher.model, live.hidden_states[-1], live.logits * 2 + 1, mask)


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
    with pytest.raises(ValueError, match="needs the teacher model itself.*cache.store=hidden"):
        quick_run(compose_cfg("model=tiny", "loss=dskd_cma", *DATA, f"trainer.teacher_cache={cache}"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="prefkd.teacher_cache"):
        TeacherCache(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="cache.store='logits'"):  # before any model loads
        make_cache(tmp_path / "bad", "model=tiny_same", "loss=kd", *DATA, "cache.store=logits")
