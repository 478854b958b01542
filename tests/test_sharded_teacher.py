"""The sharded teacher (issue 18): ``teacher.shard=true`` shards the frozen teacher's decoder layers over the processes
with FSDP2 (``prefkd.models.sharding.shard_frozen``), ``teacher.offload=cpu`` keeps their shards in CPU memory; the
embedding and the output head stay whole, so the losses read them chunk by chunk with no collective.

Two gloo processes on CPU (torchrun, the real command) with the teacher sharded and offloaded train exactly as one
process with the whole teacher and twice the batch, with DSKD-CMA (which reads the teacher's embeddings, its head and,
fused, its per-chunk logits). Bad placements fail before any model loads, naming the keys.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from omegaconf import OmegaConf

from prefkd.models.sharding import decoder_layers, is_sharded, on_device, whole_tables
from prefkd.models.tiny import build_tiny
from prefkd.training.pipeline import run
from prefkd.training.teacher_placement import TeacherPlacement, place_teacher, split_teacher_config
from tests.helpers.runs import assert_two_processes_equal_one, compose_cfg
from tests.helpers.shared import free_port
from tests.test_cli import TORCHRUN, train


# ------------------------------------------------------------------------------------------------ configuration
def test_the_placement_keys_leave_the_model_config_and_default_to_a_whole_teacher():
    node = OmegaConf.create({"_target_": "prefkd.models.tiny.build_tiny", "tokenizer": "a", "shard": True,
                             "offload": "cpu"})
    model, placement = split_teacher_config(node)
    assert "shard" not in model and "offload" not in model and model.tokenizer == "a"
    assert placement == TeacherPlacement(shard=True, offload="cpu")
    assert node.shard is True  # the run's own config (config.yaml) keeps them
    assert split_teacher_config(OmegaConf.create({"_target_": "x"}))[1] == TeacherPlacement()


@pytest.mark.parametrize("kwargs, check, message", [
    ({"offload": "gpu"}, {}, "teacher.offload='gpu': use one of none, cpu"),
    ({"shard": "yes"}, {}, "teacher.shard='yes': use true or false"),
    ({"offload": "cpu"}, {"processes": 2, "teacher_cache": False}, "set teacher.shard=true too"),
    ({"shard": True, "offload": "cpu"}, {"processes": 1, "teacher_cache": False}, "with one process"),
    ({"shard": True}, {"processes": 2, "teacher_cache": True}, "teacher.shard=true with trainer.teacher_cache"),
])
def test_placements_that_cannot_work_name_the_keys(kwargs, check, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TeacherPlacement(**kwargs).check(**check) if check else TeacherPlacement(**kwargs)


def test_a_bad_placement_fails_before_any_model_loads(tmp_path, monkeypatch):
    import prefkd.models.tiny as tiny

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the placement was checked")

    monkeypatch.setattr(tiny, "build_tiny", no_model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape("teacher.offload=cpu keeps the shards")):
        run(compose_cfg("teacher.offload=cpu"), tmp_path)
    assert time.perf_counter() - start < 10


def test_one_process_keeps_the_teacher_whole():
    model = build_tiny("a", "llama", hidden_size=32, num_layers=2, num_heads=2, seed=0).model
    placed = place_teacher(model, TeacherPlacement(shard=True), device=torch.device("cpu"), processes=1)
    assert placed is model and not is_sharded(model) and on_device(model, "cpu") is model


@pytest.mark.parametrize("arch, layer", [("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block")])
def test_what_is_sharded_and_what_stays_whole(arch, layer):
    """The repeated blocks are the FSDP units; the embedding and the head (one parameter when tied: GPT-2) stay
    whole."""
    model = build_tiny("a", arch, hidden_size=32, num_layers=3, num_heads=2, seed=0).model
    assert [type(m).__name__ for m in decoder_layers(model)] == [layer] * 3
    tables = whole_tables(model)
    assert tables[0] is model.get_input_embeddings() and tables[-1].weight is model.get_output_embeddings().weight
    assert len({id(p) for table in tables for p in table.parameters()}) == (
        1 if model.config.tie_word_embeddings else 2)


# ------------------------------------------------------------------------------------------------ two processes
def test_a_sharded_offloaded_teacher_trains_as_the_whole_teacher(tmp_path):
    """torchrun, 2 processes, batch 4, teacher sharded and offloaded = 1 process, batch 8, teacher whole: the same
    losses (to 1e-6) and weights, projectors included; fused heads on both sides; each process holds less than the
    whole teacher."""
    common = ("model=tiny", "loss=dskd_cma", "trainer.max_steps=3", "logger=none", "trainer.device=cpu",
              "trainer.eval_every=1000", "trainer.eval_at_start=false")
    two = train(*common, "trainer.batch_size=4", "teacher.shard=true", "teacher.offload=cpu",
                f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path,
                launcher=[str(TORCHRUN), "--nproc_per_node", "2", "--master_port", free_port()])
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(*common, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    _, s2 = assert_two_processes_equal_one(tmp_path)
    assert s2["fused_head"] == {"student": True, "teacher": True, "reference": False}
    said = re.search(r"sharded over 2 processes, their shards in CPU memory; this process holds ([\d.]+) of its "
                     r"([\d.]+) MB", (tmp_path / "two" / "train.log").read_text())
    assert said and float(said[1]) < float(said[2]), "the sharded teacher's log line"
    assert "teacher.shard" not in (tmp_path / "one" / "train.log").read_text()
