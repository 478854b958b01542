"""Engine-agnostic training state (issue 18): the module's parameters and the optimizer go through
``torch.distributed.checkpoint`` (:mod:`prefkd.training.train_state`), so a run sharded with FSDP2 saves and resumes
every process's optimizer shard, and a checkpoint moves between 1 and 2 processes.

In one process: the state round-trips exactly, through :func:`save_checkpoint`/:func:`load_checkpoint` too, and a
checkpoint of the older layout (``optimizer.pt``, no ``dcp/``) still resumes. With two processes (gloo on CPU,
:mod:`tests.helpers.sharded_train`, the module sharded by ``fully_shard``): a run killed right after its save and
resumed ends on the uninterrupted run's weights and optimizer state exactly; the sharded run's losses are the
single-process run's; a checkpoint written by 2 processes resumes in 1 and one written by 1 resumes in 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from prefkd.training import checkpoint as ckpt
from prefkd.training.train_state import DCP_DIR, load_train_state, read_train_state, save_train_state
from tests.helpers import sharded_train
from tests.helpers.sharded_train import build, train_step

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 6, 3


def flat(tree, prefix: str = "") -> dict:
    """The tensors and plain values of a nested state (dicts and lists) by their path."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    out = {}
    for key, value in items:
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    """Two nested states: the same entries, equal tensors (exactly unless ``atol``) and equal plain values."""
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=key)
        else:
            assert a[key] == b[key], key


def full_state(module, optimizer) -> dict:
    """Parameters and optimizer state of one process's plain module, as the sharded runs dump them."""
    model, optim = get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))
    return {"model": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.items()}, "optimizer": optim}


def trained(steps: int):
    """The helper run's module and AdamW after ``steps`` optimizer steps in this process."""
    module, optimizer = build(1)
    for step in range(steps):
        train_step(module, optimizer, step, 0, 1)
    return module, optimizer


# ---------------------------------------------------------------------------------------------- one process
def test_train_state_round_trips_exactly_and_training_goes_on_identically(tmp_path):
    module, optimizer = trained(3)
    extra = save_train_state(tmp_path / "dcp", module, optimizer)
    assert extra == {"loss._extra_state": {"steps_seen": 3}}
    saved = read_train_state(tmp_path / "dcp")
    assert saved["optimizer"]["state"]["loss.proj.weight"]["step"] == 3  # by parameter name, not position
    fresh, fresh_opt = build(1)
    load_train_state(tmp_path / "dcp", fresh, fresh_opt, extra=extra)
    assert_same(full_state(fresh, fresh_opt), full_state(module, optimizer))
    assert fresh.loss.steps_seen == 3
    for step in (3, 4):
        assert train_step(fresh, fresh_opt, step, 0, 1) == train_step(module, optimizer, step, 0, 1)
    assert_same(full_state(fresh, fresh_opt), full_state(module, optimizer))


def test_an_optimizer_without_steps_is_saved_without_state_and_left_untouched(tmp_path):
    """Reading a fresh optimizer's state through DCP would take a step of lr 0 (AdamW's step count 1): not done."""
    module, optimizer = build(1)
    extra = save_train_state(tmp_path / "dcp", module, optimizer)
    assert not optimizer.state and "optimizer" not in read_train_state(tmp_path / "dcp")
    trained_module, trained_opt = trained(1)
    load_train_state(tmp_path / "dcp", trained_module, trained_opt, extra=extra)
    assert_same(full_state(trained_module, trained_opt)["model"], full_state(module, optimizer)["model"])


def _save(path: Path, module, optimizer, step: int) -> Path:
    from prefkd.models.tiny import tiny_tokenizer

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s), last_epoch=-1)
    scheduler.last_epoch = step  # where the run's scheduler would be after `step` optimizer steps
    return ckpt.save_checkpoint(path, accelerator=Accelerator(cpu=True), module=module, tokenizer=tiny_tokenizer("a"),
                                optimizer=optimizer, scheduler=scheduler, state={"global_step": step})


def _load(path: Path):
    module, optimizer = build(1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    state = ckpt.load_checkpoint(path, accelerator=Accelerator(cpu=True), module=module, optimizer=optimizer,
                                 scheduler=scheduler)
    return module, optimizer, scheduler, state


@pytest.mark.parametrize("layout", ["dcp", "older optimizer.pt"])
def test_checkpoints_resume_exactly_in_both_layouts(tmp_path, layout):
    """save_checkpoint writes the export and trainer_state/dcp/ (no optimizer.pt); load_checkpoint restores from
    dcp/. A checkpoint as older prefkd wrote it (the export and optimizer.pt, no dcp/) still resumes exactly."""
    module, optimizer = trained(3)
    path = _save(tmp_path / "step-3", module, optimizer, 3)
    state_dir = path / ckpt.STATE_DIR
    assert (state_dir / DCP_DIR / ".metadata").is_file() and not (state_dir / ckpt.LEGACY_OPTIMIZER).exists()
    assert (path / "model.safetensors").is_file() and (path / ckpt.PROJECTORS).is_file()  # the export stays
    if layout != "dcp":
        import shutil

        shutil.rmtree(state_dir / DCP_DIR)
        torch.save(optimizer.state_dict(), state_dir / ckpt.LEGACY_OPTIMIZER)
    fresh, fresh_opt, scheduler, state = _load(path)
    assert state == {"global_step": 3} and scheduler.last_epoch == 3 and fresh.loss.steps_seen == 3
    assert_same(full_state(fresh, fresh_opt), full_state(module, optimizer))


def test_the_resume_reads_the_training_state_not_the_export(tmp_path):
    """The export is for from_pretrained users: with dcp/ present, resuming ignores it."""
    from safetensors.torch import load_file, save_file

    module, optimizer = trained(2)
    path = _save(tmp_path / "step-2", module, optimizer, 2)
    export = load_file(str(path / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in export.items()}, str(path / "model.safetensors"))
    fresh, fresh_opt, _, _ = _load(path)
    assert_same(full_state(fresh, fresh_opt), full_state(module, optimizer))


# ---------------------------------------------------------------------------------------------- two processes
def _launch(out: Path, world: int, *args: str) -> list[subprocess.Popen]:
    """The ranks of one run of tests/helpers/sharded_train.py, started in new processes (not awaited)."""
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    procs = []
    for rank in range(world):
        cmd = [sys.executable, "-m", "tests.helpers.sharded_train", "--world", str(world), "--rank", str(rank),
               "--init", str(out / "init"), "--out", str(out), "--steps", str(STEPS), *args]
        with open(out / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _in_process(out: Path, *args: str) -> None:
    """A one-process run of tests/helpers/sharded_train.py here (no process group; saves the start-up)."""
    out.mkdir(parents=True)
    sharded_train.main(["--out", str(out), "--steps", str(STEPS), *args])


def _wait(runs: dict[str, tuple[Path, list[subprocess.Popen]]], killed: tuple[str, ...] = ()) -> None:
    for name, (out, procs) in runs.items():
        codes = [p.wait(timeout=300) for p in procs]
        expected = -signal.SIGKILL if name in killed else 0
        logs = "\n".join((out / f"rank{r}.log").read_text()[-2000:] for r in range(len(procs)))
        assert codes == [expected] * len(procs), (name, codes, logs)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict[str, Path]:
    """straight2 / straight1: 6 steps on 2 sharded processes / 1 plain process (straight1 saves at step 3);
    killed2: 2 sharded processes that save at step 3 and SIGKILL themselves; fused2: straight2 with the student's
    head fused and the whole module resharded after its forward (as Accelerate's FSDP config does). Then, from those
    checkpoints:
    resumed2 (killed2's, on 2), resumed1 (killed2's, on 1), resumed2_of1 (straight1's, on 2). The one-process runs
    run in this process while the others run."""
    base = tmp_path_factory.mktemp("sharded")
    d = {name: base / name for name in ("straight2", "straight1", "killed2", "resumed2", "resumed1", "resumed2_of1",
                                        "fused2")}
    ck = {name: str(d[name] / "ck" / "dcp") for name in ("killed2", "straight1")}
    started = {"straight2": (d["straight2"], _launch(d["straight2"], 2)),
               "killed2": (d["killed2"], _launch(d["killed2"], 2, "--save-at", str(SAVE_AT), "--checkpoint",
                                                 ck["killed2"], "--die")),
               "fused2": (d["fused2"], _launch(d["fused2"], 2, "--fused", "--reshard-root"))}
    _in_process(d["straight1"], "--save-at", str(SAVE_AT), "--checkpoint", ck["straight1"])
    _wait(started, killed=("killed2",))  # fused2 too
    started = {"resumed2": (d["resumed2"], _launch(d["resumed2"], 2, "--resume", "--checkpoint", ck["killed2"])),
               "resumed2_of1": (d["resumed2_of1"],
                                _launch(d["resumed2_of1"], 2, "--resume", "--checkpoint", ck["straight1"]))}
    _in_process(d["resumed1"], "--resume", "--checkpoint", ck["killed2"])
    _wait(started)
    return d


def _dump(run: Path, name: str) -> dict:
    return torch.load(run / f"{name}.pt", weights_only=True)


def _losses(run: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((run / "losses.json").read_text()).items()}


@pytest.mark.slow
def test_a_sharded_run_killed_after_its_save_resumes_onto_the_uninterrupted_run(sharded_runs):
    d = sharded_runs
    assert not (d["killed2"] / "final.pt").exists()  # it died right after saving step 3
    assert {p.name for p in (d["killed2"] / "ck" / "dcp").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    saved = read_train_state(d["killed2"] / "ck" / "dcp")  # both processes' shards of the optimizer state
    at_save = _dump(d["killed2"], "at-save")
    assert_same(saved["optimizer"]["state"], at_save["optimizer"]["state"])
    assert_same(_dump(d["resumed2"], "loaded"), at_save)  # parameters, AdamW moments and steps, extra state
    assert_same(_dump(d["resumed2"], "final"), _dump(d["straight2"], "final"))
    assert _dump(d["resumed2"], "final")["steps_seen"] == STEPS
    straight = _losses(d["straight2"])
    assert _losses(d["resumed2"]) == {s: straight[s] for s in range(SAVE_AT + 1, STEPS + 1)}


@pytest.mark.slow
def test_the_sharded_run_agrees_with_one_process(sharded_runs):
    """FSDP2 on 2 processes and the plain module in 1: the same losses to float tolerance, every step."""
    sharded, single = _losses(sharded_runs["straight2"]), _losses(sharded_runs["straight1"])
    assert sharded.keys() == single.keys() == set(range(1, STEPS + 1))
    for step in sharded:
        assert sharded[step] == pytest.approx(single[step], rel=1e-6), step
    assert_same(_dump(sharded_runs["straight2"], "final")["model"], _dump(sharded_runs["straight1"], "final")["model"],
                atol=1e-4)


@pytest.mark.slow
def test_fused_heads_train_under_fsdp2_as_built_logits_in_one_process(sharded_runs):
    """The student's head read inside the sharded module's forward (gathered there by FSDP, freed after it with the
    root resharded, gathered again for the backward): fused on 2 processes = logits built in 1, every step."""
    fused, single = _losses(sharded_runs["fused2"]), _losses(sharded_runs["straight1"])
    assert fused.keys() == single.keys() == set(range(1, STEPS + 1))
    for step in fused:
        assert fused[step] == pytest.approx(single[step], rel=1e-6), step
    assert_same(_dump(sharded_runs["fused2"], "final")["model"], _dump(sharded_runs["straight1"], "final")["model"],
                atol=1e-4)


@pytest.mark.slow
def test_checkpoints_move_between_two_processes_and_one(sharded_runs):
    """Saved by 2 sharded processes, resumed by 1 plain one; saved by 1, resumed by 2 sharded: each loads exactly the
    state that was saved and ends on the uninterrupted weights (to the float tolerance of 1 vs 2 processes)."""
    d = sharded_runs
    assert_same(_dump(d["resumed1"], "loaded"), _dump(d["killed2"], "at-save"))
    assert_same(_dump(d["resumed2_of1"], "loaded"), _dump(d["straight1"], "at-save"))
    for resumed, straight in (("resumed1", "straight1"), ("resumed1", "straight2"), ("resumed2_of1", "straight2"),
                              ("resumed2_of1", "straight1")):
        assert_same(_dump(d[resumed], "final")["model"], _dump(d[straight], "final")["model"], atol=1e-4)


# ---------------------------------------------------------------------------------------------- Accelerate's FSDP
@pytest.mark.parametrize("lora", [False, True])
def test_accelerates_fsdp2_wraps_each_decoder_layer_of_the_student(lora):
    """Accelerate's transformer-based wrap policy reads ``_no_split_modules`` off the prepared module: the
    DistillModule hands on the student's (through peft too), so each decoder layer is its own FSDP unit instead of
    the whole student being one, gathered whole in every forward."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from prefkd.losses.kd import KDLoss
    from prefkd.models.loading import apply_lora
    from prefkd.models.tiny import build_tiny
    from prefkd.training.distill_module import DistillModule

    student = build_tiny("a", "llama", hidden_size=32, num_layers=3, num_heads=2, seed=0).model
    if lora:
        student = apply_lora(student, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    module = DistillModule(student, KDLoss())
    policy = fsdp2_prepare_auto_wrap_policy(plugin, module)
    assert [type(m).__name__ for m in module.modules() if policy(m)] == ["LlamaDecoderLayer"] * 3
