"""Reliability (issue 9): non-finite steps are skipped and K in a row stop the run with a clear error; SIGKILL at
random moments (some inside a checkpoint save) and SIGTERM, each followed by `trainer.resume=auto`, end with the
weights of an uninterrupted run; secrets never reach the run directory.

Faults are injected with :class:`FaultyKD`, KD whose loss (or only its gradient) is NaN on chosen optimizer
steps, picked by Hydra through ``loss._target_=tests.test_reliability.FaultyKD`` (also in subprocesses: the
checkout's src/ and root are put on PYTHONPATH). Everything runs on the tiny same-tokenizer pair, single-threaded.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefkd.losses.kd import KDLoss
from prefkd.training import checkpoint as ckpt
from prefkd.training.pipeline import run
from prefkd.training.train_state import read_train_state
from prefkd.training.trainer import NonFiniteLossError
from tests.helpers.runs import assert_same_weights, compose_cfg, weights
from tests.helpers.shared import free_port

REPO = Path(__file__).resolve().parents[1]
PYTHONPATH = f"{REPO / 'src'}{os.pathsep}{REPO}"  # the subprocesses run this checkout's prefkd and tests
FAULTY = "loss._target_=tests.test_reliability.FaultyKD"
SMALL = ("trainer.num_threads=1", "dataset.source.n_train=128", "dataset.source.n_dev=16", "trainer.dev_limit=8",
         "trainer.eval_every=1000", "trainer.log_every=1")
SECRETS = {"WANDB_API_KEY": "sk-test-0123456789abcdef0123456789abcdef0123",
           "HUGGINGFACE_TOKEN": "hf_TEST_reliability_secret_9f8e7d6c5b4a"}
DOTENV_SECRET = "hf_TEST_dotenv_secret_a1b2c3d4e5"  # only in a .env file in the working directory


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class FaultyKD(KDLoss):
    """KDLoss with faults on chosen optimizer steps (0-based ``LossInputs.step``; training only): the loss is
    NaN on ``nan_steps``; on ``nan_grad_steps`` the loss is finite and its gradient NaN; ``only_rank``: only on
    the process of that RANK."""

    def __init__(self, nan_steps=(), nan_grad_steps=(), only_rank=None, **kwargs):
        super().__init__(**kwargs)
        self.nan_steps, self.nan_grad_steps = {int(s) for s in nan_steps}, {int(s) for s in nan_grad_steps}
        if only_rank is not None and int(os.environ.get("RANK", 0)) != only_rank:  # faults on one process only
            self.nan_steps, self.nan_grad_steps = set(), set()

    def forward(self, inputs):
        out = super().forward(inputs)
        if self.training and inputs.step in self.nan_steps:
            out.loss = out.loss * float("nan")
        elif self.training and inputs.step in self.nan_grad_steps:
            out.loss = _NaNGradient.apply(out.loss)
        return out


def faulty(*overrides: str, nan=(), nan_grad=()):
    return compose_cfg(FAULTY, f"+loss.nan_steps={list(nan)}", f"+loss.nan_grad_steps={list(nan_grad)}",
                       *SMALL, *overrides)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trainer_file(run_dir: Path, name: str, file: str):
    return torch.load(run_dir / "checkpoints" / name / "trainer_state" / file, weights_only=True)


# ------------------------------------------------------------------------------------------- non-finite steps
@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_one_non_finite_step_is_skipped_and_leaves_everything_unchanged(tmp_path, fault):
    """Step 3 (LossInputs.step 2) is non-finite: step-3 holds exactly step-2's weights, optimizer moments and
    scheduler position; step 4 trains again; the skip is counted in the summary and logged."""
    cfg = faulty("trainer.max_steps=20", "trainer.stop_at_step=4", "trainer.save_every=1",
                 **({"nan": [2]} if fault == "loss" else {"nan_grad": [2]}))
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 1
    assert_same_weights(weights(tmp_path / "run", "step-2"), weights(tmp_path / "run", "step-3"))
    with pytest.raises(AssertionError):
        assert_same_weights(weights(tmp_path / "run", "step-3"), weights(tmp_path / "run", "step-4"))
    opt2, opt3 = (read_train_state(tmp_path / "run" / "checkpoints" / f"step-{s}" / "trainer_state" / "dcp")[
        "optimizer"]["state"] for s in (2, 3))
    for k in opt2:  # AdamW did not step: same step count and moments (no NaN got in)
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt2[k][name], opt3[k][name]), (k, name)
    assert trainer_file(tmp_path / "run", "step-3", "scheduler.pt")["last_epoch"] == \
        trainer_file(tmp_path / "run", "step-2", "scheduler.pt")["last_epoch"] == 2
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-4" / "trainer_state" / "state.json").read_text())[
        "nonfinite_in_a_row"] == 0
    logged = {m["step"]: m for m in metrics(tmp_path / "run") if "train/loss" in m}
    assert logged[3]["train/skipped"] == 1.0 and logged[3]["train/nonfinite_steps"] == 1
    assert logged[3]["train/nonfinite_loss" if fault == "loss" else "train/nonfinite_grad"] == 1.0
    assert math.isfinite(logged[3]["train/loss"]) == (fault == "grad")  # grad: a finite loss, a NaN gradient
    assert "train/skipped" not in logged[2] and "train/skipped" not in logged[4]


def test_skips_that_are_not_consecutive_never_stop_the_run(tmp_path):
    summary = run(faulty("trainer.max_steps=8", "trainer.max_nonfinite_in_a_row=3", nan=[1, 2], nan_grad=[4, 5]),
                  tmp_path / "run")
    assert summary["finished"] and summary["steps"] == 8 and summary["nonfinite_steps"] == 4


def test_k_non_finite_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path):
    """Steps 4, 5, 6 are NaN (K = 3): the run stops at step 6. step-4 was saved inside the streak (its state
    says so), so the last good checkpoint is step-2; nothing is saved from the bad state."""
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        run(faulty("trainer.max_steps=20", "trainer.save_every=2", "trainer.max_nonfinite_in_a_row=3",
                   nan=[3, 4], nan_grad=[5]), run_dir)
    message = str(err.value)
    good = run_dir / "checkpoints" / "step-2"
    for part in ("training stopped at step 6", "3 optimizer steps in a row (steps 4..6)",
                 f"the last good checkpoint is {good} (step 2)", f"trainer.resume={good}", "fp16 overflow",
                 "trainer.precision=bf16", "learning rate too high", "bad data"):
        assert part in message, (part, message)
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert names == {"step-2", "step-4"}, names  # no step-6, no `last`, nothing half-written
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["finished"] is False and summary["stopped"] == "nonfinite" and summary["error"] == message
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 3 and err.value.summary == summary
    assert [m["step"] for m in metrics(run_dir) if m.get("train/skipped")] == [4, 5, 6]
    assert [m["train/nonfinite_in_a_row"] for m in metrics(run_dir) if m.get("train/skipped")] == [1, 2, 3]


def test_non_finite_from_the_first_step_fails_on_the_command_line(tmp_path):
    """Every step NaN: `python -m prefkd.train` exits non-zero (not 75) with the message, which also lands in
    train.log and train_summary.json; no checkpoint exists. The run logs to wandb (offline) with secrets in the
    environment and in a .env file: none of them appears in any file of the run directory."""
    (tmp_path / ".env").write_text(f"HF_TOKEN={DOTENV_SECRET}\n")
    run_dir = tmp_path / "run"
    args = ["model=tiny_same", "loss=kd", FAULTY, f"+loss.nan_steps={list(range(10))}", "logger=wandb",
            "trainer.device=cpu", "trainer.eval_at_start=false", "trainer.max_steps=10",
            "trainer.max_nonfinite_in_a_row=2", *SMALL, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}
    env.pop("HF_TOKEN", None)
    res = subprocess.run([sys.executable, "-m", "prefkd.train", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]  # not 0, not 75 (pre-emption): a failure
    assert "NonFiniteLossError" in res.stderr and "training stopped at step 2" in res.stderr, res.stderr[-3000:]
    assert "no checkpoint was saved yet" in res.stderr and "trainer.precision=bf16" in res.stderr
    assert "training stopped at step 2" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["stopped"] == "nonfinite" and "no checkpoint was saved yet" in summary["error"]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert_no_secret(run_dir, [*SECRETS.values(), DOTENV_SECRET])


def test_two_processes_stop_together_when_one_sees_non_finite_gradients(tmp_path):
    """torchrun with 2 processes (gloo): rank 1's gradients are NaN on steps 2 and 3 (rank 0's are fine). Both
    processes skip those steps and stop at step 3 with the error (no process left waiting in a collective)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = ["--nproc_per_node", "2", "--master_port", free_port(), "-m", "prefkd.train", "model=tiny_same", "loss=kd",
            FAULTY, "+loss.nan_grad_steps=[1,2]", "+loss.only_rank=1", "logger=none", "trainer.device=cpu",
            "trainer.eval_at_start=false", "trainer.max_steps=8", "trainer.batch_size=4",
            "trainer.max_nonfinite_in_a_row=2", *SMALL, f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}
    res = subprocess.run([str(torchrun), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0, res.stderr[-3000:]
    assert res.stderr.count("NonFiniteLossError: training stopped at step 3") == 2, res.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["stopped"] == "nonfinite" and summary["nonfinite_steps"] == 2 and summary["steps"] == 3


def assert_no_secret(run_dir: Path, secrets: list[str]) -> int:
    """No secret's bytes in any file under run_dir; returns the number of files read."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret[:8]}... written to {path}"
    assert files
    return len(files)


# ------------------------------------------------------------------------------------------- kills and resumes
FAULT_STEPS = 12
# on-policy for half the steps (seed 42: steps 0, 2, 4, 6 of 12 sample): the samples of a resumed step are the
# uninterrupted run's (prefkd.training.on_policy seeds them by the step, which the checkpoint holds)
FAULT_COMMON = (f"trainer.max_steps={FAULT_STEPS}", "trainer.save_every=2", "trainer.keep_best=100", *SMALL,
                "trainer.on_policy.fraction=0.5", "trainer.on_policy.max_new_tokens=8")
FAULT_ARGS = ("model=tiny_same", "loss=kd", "logger=none", "run_name=test", "trainer.device=cpu",
              "trainer.eval_at_start=false", *FAULT_COMMON)  # = compose_cfg(*FAULT_COMMON) on the command line


def _tmp_dirs(checkpoints: Path) -> set[tuple[str, int, int]]:
    """Identity (name, inode, ctime) of every .tmp-* folder: a save that starts makes a new one."""
    out = set()
    try:
        for entry in os.scandir(checkpoints):
            if entry.name.startswith(".tmp-"):
                st = entry.stat(follow_symlinks=False)
                out.add((entry.name, st.st_ino, st.st_ctime_ns))
    except FileNotFoundError:
        pass
    return out


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def check_checkpoint_dirs(checkpoints: Path) -> list[str]:
    """Every folder is a complete checkpoint (state.json and loadable weights) or a dot-folder leftover
    (.tmp-* of an interrupted save, .old-* of an interrupted swap) that find_latest ignores. Returns leftovers."""
    leftovers = []
    for child in sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []:
        if child.name.startswith("."):
            assert child.name.startswith((".tmp-", ".old-")), child
            leftovers.append(child.name)
            continue
        assert ckpt.is_complete(child), f"{child} is neither complete nor a dot-folder leftover"
        assert load_file(str(child / "model.safetensors")), child
    latest = ckpt.find_latest(checkpoints)
    assert latest is None or not latest.name.startswith(".")
    return leftovers


def test_sigkill_at_random_moments_and_resume_give_the_uninterrupted_weights(tmp_path):
    """A 12-step run (checkpoint every 2 steps) as `python -m prefkd.train` subprocesses: each cycle kills it
    with SIGKILL at a seeded random moment, either a random delay after its first new training step or a random
    delay after a chosen checkpoint save has started (its .tmp- folder appeared); one cycle sends SIGTERM instead
    (exit 75, a checkpoint at the reported step). Each next cycle resumes with trainer.resume=auto. After every
    cycle the checkpoint folders are complete or ignored leftovers; at the end the weights equal an uninterrupted
    run's exactly. Secrets in the environment reach no file of the run directory."""
    straight = run(compose_cfg(*FAULT_COMMON), tmp_path / "straight")
    assert straight["steps"] == FAULT_STEPS and straight["on_policy"]["sampled_steps"] == 4

    rng = random.Random(9)
    run_dir, cwd = tmp_path / "killed", tmp_path / "cwd"
    cwd.mkdir()
    (cwd / ".env").write_text(f"HF_TOKEN={DOTENV_SECRET}\n")
    checkpoints, metrics_file = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "prefkd.train", *FAULT_ARGS, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **SECRETS, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}
    env.pop("HF_TOKEN", None)
    plan = ["save", "sigterm", "save", "step", "save", "save", "step"]  # then run to the end
    log = []
    for cycle in range(len(plan) + 3):
        mode = plan[cycle] if cycle < len(plan) else "finish"
        latest = ckpt.find_latest(checkpoints)
        done = json.loads((latest / "trainer_state" / "state.json").read_text())["global_step"] if latest else 0
        next_save = done - done % 2 + 2  # SIGTERM may have saved an odd step
        target = min(next_save + rng.choice([0, 2]), FAULT_STEPS)  # the next save, or the one after it
        if mode == "step" and done >= FAULT_STEPS - 4:  # would likely finish before the kill: kill in a save
            mode, target = "save", next_save
        target_name = f".tmp-step-{target}"
        before_tmp, before_lines = _tmp_dirs(checkpoints), _lines(metrics_file)
        with open(tmp_path / f"cycle{cycle}.log", "w") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
            deadline, fired, delay = time.time() + 240, None, 0.0
            while proc.poll() is None and time.time() < deadline and mode != "finish":
                if mode == "save" and any(n == target_name for n, *_ in _tmp_dirs(checkpoints) - before_tmp):
                    fired, delay = "save", rng.uniform(0.0, 0.03)  # somewhere inside the save
                elif mode in ("step", "sigterm") and _lines(metrics_file) > before_lines:
                    fired, delay = "step", rng.uniform(0.0, 0.1)  # a step or a few into this cycle
                elif mode == "save" and (checkpoints / target_name[5:]).exists():
                    fired, delay = "missed save", 0.0  # polling missed the whole save: kill right after it
                if fired:
                    time.sleep(delay)
                    break
                time.sleep(0.0005)
            if proc.poll() is None and mode != "finish":
                proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
            rc = proc.wait(timeout=240)
        leftovers = check_checkpoint_dirs(checkpoints)
        new_tmp = sorted({n for n, *_ in _tmp_dirs(checkpoints) - before_tmp})
        log.append({"cycle": cycle, "mode": mode, "fired": fired, "delay_ms": round(delay * 1000, 1), "rc": rc,
                    "resumed_at": done, "new_tmp_left": new_tmp, "leftovers": leftovers})
        if mode == "sigterm" and rc == 75:
            summary = json.loads((run_dir / "train_summary.json").read_text())
            assert not summary["finished"] and ckpt.is_complete(checkpoints / f"step-{summary['steps']}")
            assert ckpt.find_latest(checkpoints).name == f"step-{summary['steps']}"
        if rc == 0:
            break
        assert rc in (-signal.SIGKILL, 75), (rc, (tmp_path / f"cycle{cycle}.log").read_text()[-3000:])
    print("\nkill/resume cycles:")
    for entry in log:
        print("  ", entry)
    kills = [e for e in log if e["rc"] == -signal.SIGKILL]
    in_save = [e for e in kills if e["new_tmp_left"]]
    print(f"{len(log)} processes: {len(kills)} SIGKILLs ({len(in_save)} inside a checkpoint save), "
          f"{sum(e['rc'] == 75 for e in log)} SIGTERM, then finished")
    assert log[-1]["rc"] == 0 and len(kills) >= 4 and in_save, log
    assert any(e["rc"] == 75 for e in log), log
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["finished"] and summary["steps"] == FAULT_STEPS
    assert_same_weights(weights(tmp_path / "straight"), weights(run_dir))
    assert summary["last_train_loss"] == straight["last_train_loss"]
    assert summary["on_policy"]["sampled_steps"] == 4  # the counters resume with the state
    assert_no_secret(run_dir, [*SECRETS.values(), DOTENV_SECRET])


class _Killed(BaseException):
    """Stands for a SIGKILL at one exact point of the trainer (raised through everything, like a kill)."""


def test_a_kill_between_the_save_and_the_best_link_keeps_best_consistent(tmp_path, monkeypatch):
    import prefkd.training.checkpoint

    real_link = prefkd.training.checkpoint.link_checkpoint

    def link_or_die(src, dest):
        if Path(dest).name == "best":
            raise _Killed(f"killed while linking {src} -> {dest}")
        real_link(src, dest)

    common = ("trainer.max_steps=4", "trainer.save_every=2", *SMALL)
    monkeypatch.setattr(prefkd.training.checkpoint, "link_checkpoint", link_or_die)
    with pytest.raises(_Killed):
        run(compose_cfg(*common), tmp_path / "run")  # step-4 saved at the final evaluation, then "killed"
    monkeypatch.setattr(prefkd.training.checkpoint, "link_checkpoint", real_link)
    summary = run(compose_cfg(*common), tmp_path / "run")  # resume=auto: step-4 is complete, nothing to train
    assert summary["finished"] and summary["best"]["step"] == 4
    best = tmp_path / "run" / "checkpoints" / "best"
    assert ckpt.is_complete(best), "no `best` checkpoint after the resume"
    assert json.loads((best / "trainer_state" / "state.json").read_text())["global_step"] == 4


@pytest.mark.parametrize("scale", [2.0**4, 1.0])
def test_fp16_scaler_overflow_is_the_scalers_business_while_its_scale_is_above_one(scale):
    """NonFiniteGuard.skip_step with a GradScaler (CPU here; accelerate hands it to the optimizer wrapper on CUDA fp16):
    an overflow of the scaled gradients under a finite loss moves no parameter, the scaler halves its scale and
    is ready for the next step; it counts as a skipped step, and towards max_nonfinite_in_a_row only once the
    scale is down to 1."""
    from types import SimpleNamespace

    from prefkd.training.nonfinite import NonFiniteGuard
    from prefkd.training.state import TrainState

    model = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    (scaler.scale(model(torch.ones(1, 3)).sum()) * float("inf")).backward()
    scaler.unscale_(inner)  # what accelerate's clip_grad_norm_ does first: records the inf

    def step():  # accelerate's AcceleratedOptimizer.step under fp16
        scaler.step(inner)
        scaler.update()

    optimizer = SimpleNamespace(step=step, zero_grad=inner.zero_grad)
    state = TrainState(global_step=6, nonfinite_steps=2, nonfinite_in_a_row=1)
    guard = NonFiniteGuard(SimpleNamespace(scaler=scaler), optimizer, limit=3)
    metrics = guard.skip_step(state, True, 1.25, float("inf"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not inner.state
    assert all(p.grad is None for p in model.parameters())
    assert metrics["skipped"] == 1.0 and metrics["nonfinite_grad"] == 1.0 and state.nonfinite_steps == 3
    assert scaler.get_scale() == scale / 2  # the scaler saw the overflow and backed off
    assert state.nonfinite_in_a_row == (1 if scale > 1 else 2)  # at scale 1 the overflow counts
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()  # the next step: the scaler was reset, it trains
    scaler.unscale_(inner)
    step()
    assert not torch.equal(before["weight"], model.weight.detach())


def test_an_unset_model_path_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"leaves student.path unset .*student.path=<a checkpoint directory"):
        run(compose_cfg("student=checkpoint"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"dataset.source.train=<a JSONL file>"):
        run(compose_cfg("dataset=jsonl"), tmp_path / "run2")


def test_a_missing_data_file_fails_before_any_model_loads_and_names_prefkd_shared(tmp_path, monkeypatch):
    """The records are read before the models: with a student path that cannot load, the error is the data's. A file
    the configs expect under ${shared_dir:} names PREFKD_SHARED."""
    monkeypatch.setenv("PREFKD_SHARED", str(tmp_path / "shared"))
    bad_student = ("student=checkpoint", f"student.path={tmp_path / 'no-model'}")
    with pytest.raises(Exception, match=r"(?s)dolly_dev.jsonl: not found; .*set PREFKD_SHARED"):  # via Hydra
        run(compose_cfg("experiment=demo_table", "loss=sft", *bad_student), tmp_path / "run")
    with pytest.raises(Exception, match=r"(?s)nowhere.jsonl: not found; expected a JSONL file"):
        run(compose_cfg("dataset=jsonl", f"dataset.source.train={tmp_path / 'nowhere.jsonl'}", *bad_student),
            tmp_path / "run2")


def test_a_teacher_without_a_tokenizer_says_how_to_give_one(tmp_path):
    from prefkd.models.tiny import build_tiny

    bundle = build_tiny("a", "llama", 32, num_layers=1, seed=1)
    bundle.model.save_pretrained(tmp_path / "teacher")  # weights only, no tokenizer files
    with pytest.raises(Exception, match=r"(?s)no loadable tokenizer.*teacher.tokenizer_path=DIR"):  # via Hydra
        run(compose_cfg("model=tiny_same", "teacher=checkpoint", f"teacher.path={tmp_path / 'teacher'}"),
            tmp_path / "run")
