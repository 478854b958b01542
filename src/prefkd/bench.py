"""`python -m prefkd.bench [--losses a,b,c] [--shape k=v,...] [--json FILE]`: one optimizer step per loss, timed.

Each loss runs on the same batch of real Dolly dev records, tokenised by a real tokenizer pair (``--pair``, default
Qwen1.5 → GPT-2 from ``$PREFKD_SHARED/tokenizers``), with random models of the real vocabulary sizes
and the hidden sizes / depths of ``--shape``. A step is: teacher forward (no grad; run for EVERY loss, sft included,
so ratios compare the loss work), student forward and backward, the loss, AdamW. Reported per loss, after
``warmup`` untimed steps, over ``repeats`` steps:

- ``step_ms``: median step time; ``ratio_vs_sft`` = step_ms / step_ms of ``sft`` in the same run;
- ``loss_ms``: median time of the loss alone (forward + backward on detached logits / hidden states);
- ``peak_mem_mb``: CUDA: peak allocated memory of a step; CPU: peak bytes of live tensors during a step (tracked by
  a dispatch mode in one extra, untimed step);
- ``loss_extra_btv``: the loss's peak extra memory beyond its inputs, in units of one B×T×V fp32 tensor (the
  student logits' size): the issue-8 target is ≤ 2.

Fused output heads (issue 17, ``--fused``, default ``sft,kd``): each loss on a same-vocabulary pair (the student's
vocabulary; the teacher has the student's tokenizer and the teacher's shape), with the logits built and with the
head fused into the loss (``trainer.fused_head``), in the same run:

- ``step_ms_unfused`` / ``step_ms_fused`` and their ``ratio`` (fused / unfused; the target is ≤ 1.0);
- ``peak_btv_unfused`` / ``peak_btv_fused``: the peak bytes of live tensors from the hidden states to the gradients
  w.r.t. the hidden states and the head weight (the logits included when they are built; the head weight's V×H
  gradient excluded), in units of one B×T×V fp32 tensor (the target is ≤ 0.5).

Also: the alignment precompute rate (examples/s of the losses' data hooks on Dolly dev records) and the Sinkhorn
solver alone (:mod:`prefkd.ot.bench`, when POT is installed). Alignments are precomputed outside the timed step,
as in training (they are data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prefkd.utils.devices import resolve_device
from prefkd.utils.labels import IGNORE_INDEX

DEFAULT_LOSSES = ("sft", "kd", "uld", "minedit", "dskd_cma", "multilevel_ot", "mcw_kd")
FUSED_LOSSES = ("sft", "kd")  # the losses that take a fused output head so far (issue 17)
DEFAULT_SHAPE = {"batch": 4, "max_length": 256, "max_prompt_length": 128, "student_hidden": 256, "student_layers": 2,
                 "teacher_hidden": 256, "teacher_layers": 2}
PAIRS = {"qwen_gpt2": ("qwen1.5", "gpt2"), "mistral_tinyllama": ("mistral", "tinyllama")}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors allocated by aten ops while active and still alive (views / in-place ops excluded).
    Tensors shaped as one of ``skip`` are not counted (a head weight's gradient)."""

    def __init__(self, skip: tuple[tuple[int, ...], ...] = ()):
        super().__init__()
        self.live = self.peak = 0
        self.skip = set(skip)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and tuple(t.shape) not in self.skip:
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def shared_dir() -> Path:
    from prefkd.utils.config import shared_dir as configured

    path = Path(configured())
    if not (path / "tokenizers").is_dir():
        raise FileNotFoundError(f"{path}/tokenizers not found: set PREFKD_SHARED to the folder holding tokenizers/ "
                                f"and data/")
    return path


def make_loss(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from prefkd.utils.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"loss={name}", *overrides])
    return instantiate(cfg.loss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _prepared(name: str, teacher, student, records, shape: dict, device: torch.device, loss_overrides: list[str]):
    """(loss set up and built, the collated batch on ``device``, AdamW over the student and the loss's modules, the
    batch's response tokens)."""
    from prefkd.data.dataset import DistillDataset

    loss = make_loss(name, loss_overrides)
    loss.setup(student.tokenizer, teacher.tokenizer)
    loss.build(student.model, teacher.model)
    loss.to(device)
    ds = DistillDataset(records, student.tokenizer, teacher.tokenizer, max_prompt_length=shape["max_prompt_length"],
                        max_length=shape["max_length"], precompute=loss.precompute,
                        precompute_version=loss.precompute_version, use_cache=False)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in
             ds.collate(list(ds), student.tokenizer.pad_token_id, teacher.tokenizer.pad_token_id).items()}
    params = [p for p in student.model.parameters() if p.requires_grad]
    params += [p for m in loss.trainable_modules() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    return loss, batch, opt, max(int(batch["labels"].ne(IGNORE_INDEX).sum()), 1)


def bench_loss(name: str, teacher, student, records, shape: dict, device: torch.device, warmup: int,
               repeats: int, loss_overrides: list[str]) -> dict:
    """Times of one loss (see the module docstring)."""
    from prefkd.losses.base import LossInputs, ModelOutputs

    loss, batch, opt, n_units = _prepared(name, teacher, student, records, shape, device, loss_overrides)
    hidden = loss.needs.hidden_states

    def forward_teacher():
        with torch.no_grad():
            t = teacher.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                              output_hidden_states=hidden)
        return ModelOutputs(t.logits, t.hidden_states[-1] if hidden else None, teacher.model)

    def step():
        t_out = forward_teacher()
        s = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=hidden)
        s_out = ModelOutputs(s.logits, s.hidden_states[-1] if hidden else None, student.model)
        out = loss(LossInputs(batch=batch, student=s_out, teacher=t_out))
        (out.loss / n_units).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():  # inputs of the loss-only timing: detached leaves
        s = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=hidden)
        t_out = forward_teacher()
    leaves = (s.logits.detach(), s.hidden_states[-1].detach() if hidden else None)

    def fresh_leaves():
        return (leaves[0].clone().requires_grad_(True),
                None if leaves[1] is None else leaves[1].clone().requires_grad_(True))

    def loss_only(inputs=None):
        logits, h = inputs or fresh_leaves()
        out = loss(LossInputs(batch=batch, student=ModelOutputs(logits, h, student.model), teacher=t_out))
        out.loss.backward()

    step_ms = _median_ms(step, warmup, repeats, device)
    loss_ms = _median_ms(loss_only, 1, repeats, device)
    btv = leaves[0].numel() * 4
    tracker, inputs = LiveBytes(), fresh_leaves()
    with tracker:  # the loss's own peak beyond its inputs (CPU and CUDA alike); the gradient counts
        loss_only(inputs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        step_tracker = LiveBytes()
        with step_tracker:
            step()
        peak = step_tracker.peak
    return {"step_ms": round(step_ms, 2), "loss_ms": round(loss_ms, 2), "peak_mem_mb": round(peak / 2**20, 1),
            "loss_extra_btv": round(tracker.peak / btv, 2),
            "tokens": {"student": int(batch["attention_mask"].sum()), "teacher":
                       int(batch["teacher_attention_mask"].sum())}}


def peak_from_hidden(loss, batch: dict, student, teacher, *, fused: bool) -> float:
    """Peak bytes of live tensors from the hidden states to the gradients w.r.t. the student's hidden states and head
    weight (the head weight's gradient excluded), in B×T×V fp32 units (V: the student's head rows). ``fused``: the
    loss gets hidden states and heads; otherwise the logits head(h) are built inside the measured region. ``student``
    and ``teacher`` are the models (the teacher is read only when the loss needs it)."""
    from prefkd.losses.base import LossInputs
    from prefkd.models.heads import forward_hidden, output_head
    from prefkd.training.fused_head import outputs_from_hidden

    with torch.no_grad():
        s_hidden = forward_hidden(student, batch["input_ids"], batch["attention_mask"])
        t_hidden = (forward_hidden(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
                    if loss.needs.teacher else None)
    h = s_hidden.detach().requires_grad_(True)
    weight = output_head(student).weight
    tracker = LiveBytes(skip=(tuple(weight.shape),))
    with tracker:
        s = outputs_from_hidden(student, h, fused=fused)
        with torch.no_grad():
            t = None if t_hidden is None else outputs_from_hidden(teacher, t_hidden, fused=fused)
        out = loss(LossInputs(batch=batch, student=s, teacher=t))
        torch.autograd.grad(out.loss, [h, weight])
    return tracker.peak / (h.shape[0] * h.shape[1] * weight.shape[0] * 4)


def bench_fused(name: str, teacher, student, records, shape: dict, device: torch.device, warmup: int,
                repeats: int, loss_overrides: list[str]) -> dict:
    """One loss with its models' logits built and with fused heads (see the module docstring), on a same-vocabulary
    pair: step times, their ratio (fused / unfused) and the peaks of :func:`peak_from_hidden`."""
    from prefkd.losses.base import LossInputs
    from prefkd.training.fused_head import model_outputs

    loss, batch, opt, n_units = _prepared(name, teacher, student, records, shape, device, loss_overrides)
    if not loss.fused_head:
        raise SystemExit(f"--fused {name}: this loss takes no fused output head (yet); fused losses: "
                         f"{', '.join(FUSED_LOSSES)}")
    hidden = loss.needs.hidden_states

    def step(fused: bool) -> None:
        with torch.no_grad():
            t = model_outputs(teacher.model, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                              hidden=hidden, fused=fused)
        s = model_outputs(student.model, batch["input_ids"], batch["attention_mask"], hidden=hidden, fused=fused)
        (loss(LossInputs(batch=batch, student=s, teacher=t)).loss / n_units).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = {}
    for fused, label in ((False, "unfused"), (True, "fused")):
        result[f"step_ms_{label}"] = round(_median_ms(lambda f=fused: step(f), warmup, repeats, device), 2)
        result[f"peak_btv_{label}"] = round(peak_from_hidden(loss, batch, student.model, teacher.model,
                                                             fused=fused), 3)
    result["ratio"] = round(result["step_ms_fused"] / result["step_ms_unfused"], 3)
    return result


def run_fused(losses, student, s_name: str, root: Path, shape: dict, dev: torch.device, records, warmup: int,
              repeats: int, overrides: list[str]) -> dict:
    """:func:`bench_fused` for each loss, with a teacher of the teacher's shape on the student's tokenizer."""
    from prefkd.models.tiny import build_shrunk

    teacher = build_shrunk(root / "tokenizers" / s_name, hidden_size=shape["teacher_hidden"],
                           num_layers=shape["teacher_layers"], num_heads=4, seed=1, freeze=True)
    teacher.model.to(dev)
    result = {"pair": f"{s_name} -> {s_name}", "losses": {}}
    for name in losses:
        r = result["losses"][name] = bench_fused(name, teacher, student, records, shape, dev, warmup, repeats,
                                                 overrides)
        print(f"{name + ' fused':>14}: step {r['step_ms_fused']:9.1f} ms (unfused {r['step_ms_unfused']:.1f}, ratio "
              f"{r['ratio']:.2f})   from hidden states {r['peak_btv_fused']:.2f} B×T×V fp32 (unfused "
              f"{r['peak_btv_unfused']:.2f})", flush=True)
    return result


def precompute_rate(teacher, student, records, shape: dict, loss_overrides: list[str]) -> dict:
    """Examples per second of the losses' precompute hooks (MinED alignment, MCW-KD lexical cost)."""
    from prefkd.data.dataset import DistillDataset

    rates = {}
    for name in ("minedit", "mcw_kd"):
        loss = make_loss(name, loss_overrides)
        loss.setup(student.tokenizer, teacher.tokenizer)  # vocabulary maps etc.: built (or cached) before timing
        kw = dict(max_prompt_length=shape["max_prompt_length"], max_length=shape["max_length"], use_cache=False)
        t0 = time.perf_counter()
        DistillDataset(records, student.tokenizer, teacher.tokenizer, **kw)
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        DistillDataset(records, student.tokenizer, teacher.tokenizer, precompute=loss.precompute,
                       precompute_version=loss.precompute_version, **kw)
        hook = max(time.perf_counter() - t0 - base, 1e-9)
        rates[name] = {"examples": len(records), "hook_s": round(hook, 3),
                       "examples_per_s": round(len(records) / hook, 1)}
    return rates


def run(losses, shape: dict, pair: str = "qwen_gpt2", device: str = "auto", warmup: int = 1, repeats: int = 3,
        precompute_examples: int = 200, sinkhorn: bool = True, loss_overrides: list[str] | None = None,
        fused=FUSED_LOSSES) -> dict:
    from prefkd.data.records import read_jsonl
    from prefkd.models.tiny import build_shrunk

    dev = resolve_device(device)
    root = shared_dir()
    t_name, s_name = PAIRS[pair]
    teacher = build_shrunk(root / "tokenizers" / t_name, hidden_size=shape["teacher_hidden"],
                           num_layers=shape["teacher_layers"], num_heads=4, seed=1, freeze=True)
    student = build_shrunk(root / "tokenizers" / s_name, hidden_size=shape["student_hidden"],
                           num_layers=shape["student_layers"], num_heads=4, seed=2)
    teacher.model.to(dev)
    student.model.to(dev)
    all_records = read_jsonl(root / "data/instruct/dolly_dev.jsonl")
    records = sorted(all_records, key=lambda r: -len(r["prompt"]) - len(r["output"]))[:shape["batch"]]
    overrides = list(loss_overrides or [])
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "pair": f"{t_name} -> {s_name}",
              "shape": {**shape, "student_vocab": len(student.tokenizer), "teacher_vocab": len(teacher.tokenizer)},
              "losses": {}}
    for name in losses:
        r = bench_loss(name, teacher, student, records, shape, dev, warmup, repeats, overrides)
        result["losses"][name] = r
        print(f"{name:>14}: step {r['step_ms']:9.1f} ms   loss {r['loss_ms']:8.1f} ms   peak {r['peak_mem_mb']:8.1f} "
              f"MB   loss extra {r['loss_extra_btv']:.2f} B×T×V fp32", flush=True)
    if "sft" in result["losses"]:
        base = result["losses"]["sft"]["step_ms"]
        for r in result["losses"].values():
            r["ratio_vs_sft"] = round(r["step_ms"] / base, 3)
    if fused:
        result["fused_head"] = run_fused(fused, student, s_name, root, shape, dev, records, warmup, repeats, overrides)
    if precompute_examples:
        result["precompute"] = precompute_rate(teacher, student, all_records[:precompute_examples], shape, overrides)
    if sinkhorn:
        try:
            from prefkd.ot.bench import benchmark
            result["sinkhorn"] = benchmark(device=dev.type, repeats=3)
        except ImportError:
            result["sinkhorn"] = "skipped (pip install pot)"
    return result


def parse_shape(text: str) -> dict:
    shape = dict(DEFAULT_SHAPE)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in shape:
            raise SystemExit(f"--shape: unknown key {key!r}; keys: {', '.join(shape)}")
        shape[key] = int(value)
    return shape


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default=",".join(DEFAULT_LOSSES), help="comma-separated loss configs")
    p.add_argument("--fused", default=",".join(FUSED_LOSSES),
                   help="losses compared with fused output heads against built logits ('' skips)")
    p.add_argument("--shape", default="", help=f"k=v,... overriding {DEFAULT_SHAPE}")
    p.add_argument("--pair", default="qwen_gpt2", choices=sorted(PAIRS))
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precompute-examples", type=int, default=200, help="0 skips the precompute rate")
    p.add_argument("--no-sinkhorn", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every loss, e.g. loss.chunk_size=512")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    losses = [x for x in args.losses.split(",") if x]
    if "sft" not in losses:
        losses = ["sft", *losses]  # the baseline of ratio_vs_sft
    result = run(losses, parse_shape(args.shape), args.pair, args.device, args.warmup, args.repeats,
                 args.precompute_examples, not args.no_sinkhorn, args.overrides,
                 fused=[x for x in args.fused.split(",") if x])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
