"""prefkd.training.engine_checks: the engine settings prefkd cannot run fail at start, naming the key and the fix;
the example accelerate configs resolve (accelerate's own loader and launch environment) to engines that pass.

DeepSpeed is not installed here: its engines are described from Accelerate's ``DeepSpeedPlugin``, built from the
``ACCELERATE_*`` environment that ``accelerate launch --config_file`` would set (the plugin needs no DeepSpeed)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType
from omegaconf import OmegaConf

from prefkd.losses.base import Needs
from prefkd.training import pipeline
from prefkd.training.engine_checks import (
    Engine,
    check_engine,
    check_sharded_models,
    describe_engine,
    engine_from_plugin,
    fill_deepspeed_batch_size,
)
from prefkd.utils.config import config_dir
from tests.helpers.runs import compose_cfg

ACCELERATE = Path(config_dir()) / "accelerate"
DEFAULT_TRAINER = OmegaConf.load(Path(config_dir()) / "trainer" / "default.yaml")


def cfg_with(**trainer):
    """The default trainer config with ``trainer`` overrides (dotted keys), inside a train config."""
    cfg = OmegaConf.create({"trainer": OmegaConf.to_container(DEFAULT_TRAINER), "student": {"lora": None},
                            "loss": {"_target_": "prefkd.losses.kd.KDLoss"}})
    for key, value in trainer.items():
        OmegaConf.update(cfg, f"trainer.{key.replace('__', '.')}", value)
    return cfg


def deepspeed(stage=2, processes=4, **fields) -> Engine:
    values = {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "gather_16bit_on_save": stage == 3,
              "offload_optimizer": "none", "offload_param": "none", **fields}
    return Engine(kind="DEEPSPEED", processes=processes, zero_stage=stage, **values)


def fails(engine: Engine, cfg, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        check_engine(engine, cfg)
    for fragment in fragments:
        assert fragment in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- check_engine, one combination at a time
def test_the_default_trainer_runs_on_every_engine():
    for engine in (Engine("NO"), Engine("MULTI_GPU", 4), Engine("FSDP", 4), deepspeed(2), deepspeed(3)):
        check_engine(engine, cfg_with())


def test_deepspeed_gradient_accumulation_must_be_1():
    fails(deepspeed(gradient_accumulation_steps=4), cfg_with(gradient_accumulation_steps=2),
          "DeepSpeed gradient_accumulation_steps=4", "deepspeed_config.gradient_accumulation_steps: 1",
          "trainer.gradient_accumulation_steps=8 instead")


def test_deepspeed_clipping_must_equal_max_grad_norm():
    fails(deepspeed(gradient_clipping=0.5), cfg_with(), "gradient_clipping=0.5 but trainer.max_grad_norm=1.0",
          "DeepSpeed's value would win", "deepspeed_config.gradient_clipping: 1 ", "trainer.max_grad_norm=0.5")
    # no clipping on either side agrees: trainer.max_grad_norm=null is DeepSpeed's 0
    fails(deepspeed(gradient_clipping=1.0), cfg_with(max_grad_norm=None), "trainer.max_grad_norm=None",
          "deepspeed_config.gradient_clipping: 0 ")
    check_engine(deepspeed(gradient_clipping=0.0), cfg_with(max_grad_norm=None))
    fails(deepspeed(gradient_clipping=0.0), cfg_with(), "trainer.max_grad_norm=null")


def test_zero3_must_gather_the_weights_on_save():
    fails(deepspeed(3, gather_16bit_on_save=False), cfg_with(), "zero3_save_16bit_model: true",
          "stage3_gather_16bit_weights_on_model_save: true", "the first save would fail")
    check_engine(deepspeed(2, gather_16bit_on_save=False), cfg_with())  # ZeRO-2 holds whole weights


@pytest.mark.parametrize("engine", [Engine("FSDP", 2), deepspeed(3, processes=2)], ids=["fsdp", "zero3"])
def test_a_sharded_student_on_several_processes_does_not_generate(engine):
    fails(engine, cfg_with(eval__rouge=True), "trainer.eval.rouge=true", "main process only", "hang",
          "Set trainer.eval.rouge=false")
    fails(engine, cfg_with(on_policy__fraction=0.5), "trainer.on_policy.fraction=0.5", "hang",
          "Set trainer.on_policy.fraction=0")


def test_generation_is_fine_where_the_student_is_whole_or_alone():
    risky = cfg_with(eval__rouge=True, on_policy__fraction=0.5)
    for engine in (Engine("FSDP", 1), deepspeed(3, processes=1), deepspeed(2), Engine("MULTI_GPU", 4)):
        check_engine(engine, risky)


def test_every_problem_is_named_at_once():
    message = fails(deepspeed(3, processes=2, gradient_accumulation_steps=2, gather_16bit_on_save=False),
                    cfg_with(eval__rouge=True), "DeepSpeed ZeRO-3 on 2 process(es)")
    assert message.count("\n- ") == 3


# ---------------------------------------------------------------- check_sharded_models
@pytest.mark.parametrize("needs,cache,lora,fragment", [
    (Needs(teacher=True), None, None, "with a teacher model"),
    (Needs(teacher=True, hidden_states=True), SimpleNamespace(store="hidden"), None, "with a teacher model"),
    (Needs(reference="teacher", pairs=True), None, {"r": 8}, "with a teacher model"),
    (Needs(reference="initial", pairs=True), None, None, "loss.reference=initial and a full (non-LoRA) student"),
])
def test_zero3_refuses_a_model_deepspeed_never_gathers(needs, cache, lora, fragment):
    cfg = cfg_with()
    cfg.student.lora = lora
    with pytest.raises(ValueError, match=re.escape(fragment)):
        check_sharded_models(deepspeed(3), needs, cfg, cache)
    check_sharded_models(deepspeed(2), needs, cfg, cache)  # ZeRO-2 does not partition parameters
    check_sharded_models(Engine("FSDP", 4), needs, cfg, cache)


def test_zero3_serves_the_student_alone():
    cfg = cfg_with()
    check_sharded_models(deepspeed(3), Needs(), cfg)  # sft
    check_sharded_models(deepspeed(3), Needs(teacher=True), cfg, SimpleNamespace(store="topk"))  # a top-k cache
    cfg.student.lora = {"r": 8}
    check_sharded_models(deepspeed(3), Needs(reference="initial", pairs=True), cfg)  # the adapter disabled


def test_fsdp_refuses_a_lora_students_reference_and_cpu_ram_efficient_loading():
    cfg = cfg_with()
    check_sharded_models(Engine("FSDP", 4), Needs(reference="initial", pairs=True), cfg)  # a full student: a copy
    cfg.student.lora = {"r": 8}
    with pytest.raises(ValueError, match=re.escape("FSDP with loss.reference=initial and a LoRA student")):
        check_sharded_models(Engine("FSDP", 4), Needs(reference="initial", pairs=True), cfg)
    check_sharded_models(Engine("MULTI_GPU", 4), Needs(reference="initial", pairs=True), cfg)  # DDP: the whole model
    with pytest.raises(ValueError, match=re.escape("fsdp_config.fsdp_cpu_ram_efficient_loading: false")):
        check_engine(Engine("FSDP", 4, cpu_ram_efficient_loading=True), cfg_with())
    check_engine(Engine("FSDP", 4, cpu_ram_efficient_loading=False), cfg_with())


# ---------------------------------------------------------------- describing the engine
def test_a_cpu_accelerator_is_one_process():
    engine = describe_engine(Accelerator(cpu=True))
    assert engine == Engine("NO", 1) and not engine.deepspeed and not engine.sharded


def test_deepspeed_auto_values_resolve_as_accelerate_fills_them(monkeypatch):
    for name in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    engine = engine_from_plugin(DistributedType.DEEPSPEED, 2, DeepSpeedPlugin(zero_stage=3))
    # auto accumulation: Accelerate's own (1); auto clipping: Accelerate fills 1.0 at prepare
    assert (engine.gradient_accumulation_steps, engine.gradient_clipping) == (1, 1.0)
    assert engine.sharded and not engine.gather_16bit_on_save and engine.micro_batch_size == "auto"


def test_the_micro_batch_size_comes_from_the_trainer():
    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    fill_deepspeed_batch_size(acc, 4)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2  # a value the user set stays
    fill_deepspeed_batch_size(acc, 4)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2


# ---------------------------------------------------------------- the example accelerate configs
def launch_environment(path: Path) -> tuple[object, dict[str, str]]:
    """``accelerate launch --config_file path -m prefkd.train``'s arguments and the ACCELERATE_* variables it sets
    for a DeepSpeed config (accelerate's own code, up to starting the processes)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "prefkd.train"])
    args, defaults, _ = _validate_launch_command(args)
    args.main_process_port = 0  # any free port: nothing starts
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    return args, {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def engine_of(path: Path, monkeypatch) -> Engine:
    """The engine a DeepSpeed accelerate config gives prefkd: its launch environment → Accelerate's plugin."""
    args, env = launch_environment(path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return engine_from_plugin(DistributedType.DEEPSPEED, args.num_processes, DeepSpeedPlugin())


EXPECTED = {"ddp.yaml": "MULTI_GPU", "multinode.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "fsdp_multinode.yaml": "FSDP",
            "deepspeed_zero2.yaml": "DEEPSPEED", "deepspeed_zero3.yaml": "DEEPSPEED"}


def test_every_example_config_is_known():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_example_configs_load_with_accelerate(name):
    config = load_config_from_file(str(ACCELERATE / name))
    assert config.distributed_type == EXPECTED[name]
    assert config.num_processes >= config.num_machines >= 1 and config.mixed_precision in ("no", "fp16", "bf16")
    if config.distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False  # what check_engine requires
    if config.distributed_type == "DEEPSPEED":
        ds = config.deepspeed_config
        assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == DEFAULT_TRAINER.max_grad_norm
        assert (ds["zero_stage"] == 3) == bool(ds.get("zero3_save_16bit_model")) == ("zero3" in name)


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_the_deepspeed_examples_pass_the_checks(name, stage, monkeypatch):
    engine = engine_of(ACCELERATE / name, monkeypatch)
    assert (engine.zero_stage, engine.processes, engine.gradient_accumulation_steps) == (stage, 4, 1)
    assert engine.gather_16bit_on_save == (stage == 3)
    check_engine(engine, cfg_with())


def test_a_deepspeed_config_that_accumulates_fails(tmp_path, monkeypatch):
    text = (ACCELERATE / "deepspeed_zero2.yaml").read_text()
    bad = tmp_path / "zero2_accumulating.yaml"
    bad.write_text(text.replace("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 4"))
    fails(engine_of(bad, monkeypatch), cfg_with(), "DeepSpeed gradient_accumulation_steps=4",
          "deepspeed_config.gradient_accumulation_steps: 1")


# ---------------------------------------------------------------- through prefkd.training.pipeline.run
class LaunchedAccelerator:
    """What pipeline.run reads of an Accelerator built under ``accelerate launch`` with a DeepSpeed config (real
    DeepSpeed cannot start here): its distributed type, process count and Accelerate state with the plugin."""

    def __init__(self, plugin: DeepSpeedPlugin, processes: int):
        self.distributed_type, self.num_processes = DistributedType.DEEPSPEED, processes
        self.state = SimpleNamespace(deepspeed_plugin=plugin, distributed_type=self.distributed_type)
        self.is_main_process = True


def test_a_bad_deepspeed_config_fails_through_the_pipeline_before_any_model(tmp_path, monkeypatch):
    text = (ACCELERATE / "deepspeed_zero3.yaml").read_text()
    bad = tmp_path / "zero3_no_gather.yaml"
    bad.write_text(text.replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false"))
    args, env = launch_environment(bad)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()
    monkeypatch.setattr(pipeline, "Accelerator", lambda **kwargs: LaunchedAccelerator(plugin, args.num_processes))
    built = []
    monkeypatch.setattr(pipeline, "instantiate", lambda node, *a, **k: built.append(node) or pytest.fail("built"))
    cfg = compose_cfg("trainer.eval.rouge=true")
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        pipeline.run(cfg, tmp_path / "run")
    assert time.perf_counter() - start < 5 and not built and not (tmp_path / "run").exists()
    assert "zero3_save_16bit_model: true" in str(info.value) and "trainer.eval.rouge=true" in str(info.value)


def test_zero3_with_a_teacher_fails_through_the_pipeline_before_any_model(tmp_path, monkeypatch):
    args, env = launch_environment(ACCELERATE / "deepspeed_zero3.yaml")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()
    monkeypatch.setattr(pipeline, "Accelerator", lambda **kwargs: LaunchedAccelerator(plugin, args.num_processes))
    monkeypatch.setattr(pipeline, "set_seed", lambda seed: None)
    built = []
    real = pipeline.instantiate
    monkeypatch.setattr(pipeline, "instantiate", lambda node, *a, **k: built.append(node._target_) or real(node))
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 with a teacher model"):
        pipeline.run(compose_cfg("loss=kd"), tmp_path / "run")
    assert built == ["prefkd.losses.kd.KDLoss"]  # the loss (what it needs), no model
