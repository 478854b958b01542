"""`python -m prefkd.bench [--losses a,b,c] [--shape PRESET,k=v,...] [--fused ...] [--peers] [--json FILE]`: one
optimizer step per loss, timed, and fused output heads against built logits.

Each loss runs on the same batch of real Dolly dev records, tokenised by a real tokenizer pair (``--pair``, default
Qwen1.5 → GPT-2 from ``$PREFKD_SHARED/tokenizers``), with random models of the real vocabulary sizes and the widths /
depths of ``--shape``: ``k=v`` overrides of :data:`DEFAULT_SHAPE`, or a preset of :data:`PRESETS` (the real models'
widths, heads, MLP sizes and depths, batch 1 × 128 tokens, and their tokenizer pair) refined by overrides. A step is:
the teacher's body (no grad; run for EVERY loss, sft included, so ratios compare the loss work: building or
projecting the teacher's logits is the loss's), student forward and backward, the loss, AdamW. Losses with a fused
output head (``fused_head``) run fused, as ``trainer.fused_head`` (default on) trains them; ``--no-fused-steps``
builds every model's logits. Reported per loss, after ``warmup`` untimed steps, over ``repeats`` steps:

- ``step_ms``: median step time; ``ratio_vs_sft`` = step_ms / step_ms of ``sft`` in the same run;
- ``loss_ms``: median time of the loss alone (forward + backward on detached logits / hidden states);
- ``peak_mem_mb``: CUDA: peak allocated memory of a step; CPU: peak bytes of live tensors during a step (tracked by
  a dispatch mode in one extra, untimed step);
- ``loss_extra_btv``: the loss's peak extra memory beyond its inputs, in units of one B×T×V fp32 tensor (the
  student logits' size; a fused head's V×H weight gradient not counted).

Fused output heads (issue 17, ``--fused``, default: every loss config whose loss sets ``fused_head``, derived from
``config/loss``): each loss with the models' logits built and with the heads fused into the loss, in the same run.
Losses that read the teacher at the student's own positions (:data:`SAME_VOCABULARY`) run on a same-vocabulary pair
(the student's tokenizer on both sides, the teacher of the teacher's shape); the others on the real cross-tokenizer
pair of the run. The preference losses run on the ``batch`` longest HH pairs of :data:`PREFERENCE_DATA` (2·batch
rows, parents on both sides, parent weights 1), with their reference model (a frozen copy of the student, or the
teacher) fused or not like the other models:

- ``step_ms_unfused`` / ``step_ms_fused`` and their ``ratio`` (fused / unfused; the target is ≤ 1.0);
- ``peak_btv_unfused`` / ``peak_btv_fused``: the peak bytes of live tensors from the hidden states to the gradients
  w.r.t. the hidden states and the head weight (the logits included when they are built; the head weight's V×H
  gradient excluded), in units of one B×T×V fp32 tensor (V: the student's head rows; the target is ≤ 0.5).

Peers (``--peers [all|a,b]``): :mod:`prefkd.bench.peers` (TRL's GKD and chunked distillation losses, eager
full-logits references of the cross-tokenizer losses), same inputs, same process: time, memory, agreement.

Also: the alignment precompute rate (examples/s of the losses' data hooks on Dolly dev records) and the Sinkhorn
solver alone (:mod:`prefkd.ot.bench`, when POT is installed). Alignments are precomputed outside the timed step,
as in training (they are data).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefkd.bench.measure import LiveBytes, median_ms
from prefkd.utils.devices import resolve_device
from prefkd.utils.labels import IGNORE_INDEX

DEFAULT_LOSSES = ("sft", "kd", "uld", "minedit", "dskd_cma", "multilevel_ot", "mcw_kd")
SAME_VOCABULARY = ("kd", "dskd")  # read the teacher at the student's positions (kd across tokenizers is minedit's work)
DEFAULT_SHAPE = {"batch": 4, "max_length": 256, "max_prompt_length": 128,
                 "student_hidden": 256, "student_layers": 2, "student_heads": 4, "student_intermediate": 0,
                 "teacher_hidden": 256, "teacher_layers": 2, "teacher_heads": 4, "teacher_intermediate": 0}
# The real pairs' widths, heads, MLP sizes and depths (config.json of each model), batch 1 × 128 tokens. Mistral-7B
# (32 layers, 29 GB in fp32) and TinyLLaMA-1.1B (22 layers, 18 GB with its gradients and AdamW state) do not fit this
# 24 GiB machine together: their depths are cut to 4 (say so with any figure from that preset).
PRESETS = {
    "gpt2_from_qwen": {"pair": "qwen_gpt2", "batch": 1, "max_length": 128, "max_prompt_length": 64,
                       "student_hidden": 768, "student_layers": 12, "student_heads": 12, "student_intermediate": 3072,
                       "teacher_hidden": 2048, "teacher_layers": 24, "teacher_heads": 16, "teacher_intermediate": 5504},
    "tinyllama_from_mistral": {"pair": "mistral_tinyllama", "batch": 1, "max_length": 128, "max_prompt_length": 64,
                               "student_hidden": 2048, "student_layers": 4, "student_heads": 32,
                               "student_intermediate": 5632, "teacher_hidden": 4096, "teacher_layers": 4,
                               "teacher_heads": 32, "teacher_intermediate": 14336},
}
PAIRS = {"qwen_gpt2": ("qwen1.5", "gpt2"), "mistral_tinyllama": ("mistral", "tinyllama")}
PREFERENCE_DATA = "data/preference/hh_harmless_test.jsonl"  # the preference losses' batch: the `batch` longest pairs


@dataclass
class Pair:
    """A teacher and a student (model bundles) with the records they read: instruction records, and preference
    pairs for the preference losses."""

    name: str
    teacher: object
    student: object
    records: list
    preference: list = field(default_factory=list)
    _initial: object = None

    def reference(self, kind: str):
        """The reference model of ``Needs.reference``: the teacher, or a frozen copy of the student as it starts
        (``initial``), made on first use."""
        if kind == "teacher":
            return self.teacher.model
        if self._initial is None:
            self._initial = copy.deepcopy(self.student.model).requires_grad_(False).eval()
        return self._initial


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


def loss_configs() -> list[str]:
    """The names of config/loss/*.yaml."""
    from prefkd.utils.config import config_dir

    return sorted(p.stem for p in (Path(config_dir()) / "loss").glob("*.yaml"))


def fused_losses() -> list[str]:
    """The loss configs whose loss takes a fused output head: derived from ``config/loss`` and each loss's
    ``fused_head`` (preference losses included: they run on preference pairs)."""
    return [name for name in loss_configs() if make_loss(name, []).fused_head]


def _batch(loss, pair: Pair, shape: dict) -> tuple[dict, int]:
    """(the collated batch of the pair's records, its normalising count): instruction records tokenised by both
    tokenizers (the loss's precompute hook run, as in training), or, for a preference loss (``needs.pairs``), the
    preference pairs as 2B rows with parents on both sides (weights 1: the bench times the loss; ``prefkd.weights``
    computes real ones). The count: response tokens, or pairs."""
    from prefkd.data.dataset import DistillDataset
    from prefkd.data.preference_dataset import PreferenceDataset, collate_pairs

    s_tok, t_tok = pair.student.tokenizer, pair.teacher.tokenizer
    lengths = dict(max_prompt_length=shape["max_prompt_length"], max_length=shape["max_length"])
    if loss.needs.pairs:
        ds = PreferenceDataset(pair.preference, s_tok, t_tok, **lengths)
        batch = collate_pairs(list(ds), s_tok.pad_token_id, t_tok.pad_token_id)
        return batch, batch["labels"].shape[0] // 2
    ds = DistillDataset(pair.records, s_tok, t_tok, **lengths, precompute=loss.precompute,
                        precompute_version=loss.precompute_version, use_cache=False)
    batch = ds.collate(list(ds), s_tok.pad_token_id, t_tok.pad_token_id)
    return batch, max(int(batch["labels"].ne(IGNORE_INDEX).sum()), 1)


def _prepared(name: str, pair: Pair, shape: dict, device: torch.device, loss_overrides: list[str]):
    """(loss set up and built, the collated batch on ``device`` (:func:`_batch`), AdamW over the student and the
    loss's modules, the batch's normalising count)."""
    teacher, student = pair.teacher, pair.student
    loss = make_loss(name, loss_overrides)
    loss.setup(student.tokenizer, teacher.tokenizer)
    loss.build(student.model, teacher.model)
    loss.to(device)
    batch, n_units = _batch(loss, pair, shape)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    params = [p for p in student.model.parameters() if p.requires_grad]
    params += [p for m in loss.trainable_modules() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    return loss, batch, opt, n_units


def _teacher_outputs(loss, teacher, batch: dict, fused: bool):
    """The teacher's outputs for the loss (no grad): its body always; its logits (or fused head) only when the loss
    reads the teacher (None otherwise)."""
    from prefkd.models.heads import forward_hidden
    from prefkd.training.fused_head import model_outputs

    with torch.no_grad():
        if not loss.needs.teacher:
            forward_hidden(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
            return None
        return model_outputs(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                             hidden=loss.needs.hidden_states, fused=fused)


def _reference_outputs(loss, pair: Pair, batch: dict, fused: bool):
    """The reference model's outputs on the student rows (no grad) when the loss has one (``Needs.reference``)."""
    from prefkd.training.fused_head import model_outputs

    if not loss.needs.reference:
        return None
    with torch.no_grad():
        return model_outputs(pair.reference(loss.needs.reference), batch["input_ids"], batch["attention_mask"],
                             hidden=False, fused=fused)


def _step(loss, pair: Pair, batch: dict, opt, n_units: int, fused: bool) -> None:
    """One optimizer step: the teacher, the reference model (a preference loss's), the student's forward (fused: no
    logits), the loss, backward, AdamW."""
    from prefkd.losses.base import LossInputs
    from prefkd.training.fused_head import model_outputs

    t = _teacher_outputs(loss, pair.teacher.model, batch, fused)
    r = _reference_outputs(loss, pair, batch, fused)
    s = model_outputs(pair.student.model, batch["input_ids"], batch["attention_mask"],
                      hidden=loss.needs.hidden_states, fused=fused)
    (loss(LossInputs(batch=batch, student=s, teacher=t, reference=r)).loss / n_units).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_loss(name: str, pair: Pair, shape: dict, device: torch.device, warmup: int, repeats: int,
               loss_overrides: list[str], fused_steps: bool = True) -> dict:
    """Times of one loss (see the module docstring)."""
    from prefkd.losses.base import LossInputs
    from prefkd.models.heads import forward_hidden, output_head
    from prefkd.training.fused_head import outputs_from_hidden

    loss, batch, opt, n_units = _prepared(name, pair, shape, device, loss_overrides)
    if loss.needs.pairs:
        raise SystemExit(f"--losses {name}: a preference loss; the main table times instruction losses (compare it "
                         f"fused against built logits with --fused {name})")
    fused = fused_steps and loss.fused_head
    student = pair.student.model
    with torch.no_grad():  # inputs of the loss-only timing: detached leaves
        s_hidden = forward_hidden(student, batch["input_ids"], batch["attention_mask"])
        t_out = _teacher_outputs(loss, pair.teacher.model, batch, fused)
    weight = output_head(student).weight

    def fresh_inputs():
        """The student side of the loss-only timing: hidden states and head (fused), or logits (a leaf)."""
        h = s_hidden.clone().requires_grad_(True)
        if fused:
            return outputs_from_hidden(student, h, fused=True)
        with torch.no_grad():
            s = outputs_from_hidden(student, h, fused=False)
        s.logits.requires_grad_(True)
        return s

    def loss_only(s=None) -> None:
        loss(LossInputs(batch=batch, student=s or fresh_inputs(), teacher=t_out)).loss.backward()

    step_ms = median_ms(lambda: _step(loss, pair, batch, opt, n_units, fused), warmup, repeats, device)
    loss_ms = median_ms(loss_only, 1, repeats, device)
    btv = batch["input_ids"].numel() * weight.shape[0] * 4
    tracker, inputs = LiveBytes(skip=(tuple(weight.shape),) if fused else ()), fresh_inputs()
    with tracker:  # the loss's own peak beyond its inputs (CPU and CUDA alike); the gradient counts
        loss_only(inputs)
    del inputs
    opt.zero_grad(set_to_none=True)  # what the loss-only runs accumulated into the parameters
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _step(loss, pair, batch, opt, n_units, fused)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        step_tracker = LiveBytes()
        with step_tracker:
            _step(loss, pair, batch, opt, n_units, fused)
        peak = step_tracker.peak
    return {"step_ms": round(step_ms, 2), "loss_ms": round(loss_ms, 2), "peak_mem_mb": round(peak / 2**20, 1),
            "loss_extra_btv": round(tracker.peak / btv, 2), "fused": fused,
            "tokens": {"student": int(batch["attention_mask"].sum()), "teacher":
                       int(batch["teacher_attention_mask"].sum()), "response": n_units}}


def peak_from_hidden(loss, batch: dict, student, teacher, *, fused: bool, reference=None) -> float:
    """Peak bytes of live tensors from the hidden states to the gradients w.r.t. the student's hidden states and head
    weight (the head weight's gradient excluded), in B×T×V fp32 units (V: the student's head rows). ``fused``: the
    loss gets hidden states and heads; otherwise the logits head(h) are built inside the measured region. ``student``
    and ``teacher`` are the models (the teacher is read only when the loss needs it), ``reference`` the reference
    model of a preference loss (its logits, or head, from its hidden states inside the region too)."""
    from prefkd.losses.base import LossInputs
    from prefkd.models.heads import forward_hidden, output_head
    from prefkd.training.fused_head import outputs_from_hidden

    with torch.no_grad():
        s_hidden = forward_hidden(student, batch["input_ids"], batch["attention_mask"])
        t_hidden = (forward_hidden(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
                    if loss.needs.teacher else None)
        r_hidden = (forward_hidden(reference, batch["input_ids"], batch["attention_mask"])
                    if reference is not None else None)
    h = s_hidden.detach().requires_grad_(True)
    weight = output_head(student).weight
    tracker = LiveBytes(skip=(tuple(weight.shape),))
    with tracker:
        s = outputs_from_hidden(student, h, fused=fused)
        with torch.no_grad():
            t = None if t_hidden is None else outputs_from_hidden(teacher, t_hidden, fused=fused)
            r = None if r_hidden is None else outputs_from_hidden(reference, r_hidden, fused=fused)
        out = loss(LossInputs(batch=batch, student=s, teacher=t, reference=r))
        torch.autograd.grad(out.loss, [h, weight])
    return tracker.peak / (h.shape[0] * h.shape[1] * weight.shape[0] * 4)


def bench_fused(name: str, pair: Pair, shape: dict, device: torch.device, warmup: int, repeats: int,
                loss_overrides: list[str]) -> dict:
    """One loss with its models' logits built and with fused heads (see the module docstring): step times, their
    ratio (fused / unfused) and the peaks of :func:`peak_from_hidden`."""
    loss, batch, opt, n_units = _prepared(name, pair, shape, device, loss_overrides)
    if not loss.fused_head:
        raise SystemExit(f"--fused {name}: this loss takes no fused output head (yet); fused losses: "
                         f"{', '.join(fused_losses())}")
    result = {"pair": pair.name}
    for fused, label in ((False, "unfused"), (True, "fused")):
        result[f"step_ms_{label}"] = round(median_ms(lambda f=fused: _step(loss, pair, batch, opt, n_units, f),
                                                     warmup, repeats, device), 2)
        reference = pair.reference(loss.needs.reference) if loss.needs.reference else None
        result[f"peak_btv_{label}"] = round(peak_from_hidden(loss, batch, pair.student.model, pair.teacher.model,
                                                             reference=reference,
                                                             fused=fused), 3)
    result["ratio"] = round(result["step_ms_fused"] / result["step_ms_unfused"], 3)
    return result


class Pairs:
    """The run's cross-tokenizer pair and, built on first use, its same-vocabulary pair (the student's tokenizer on
    both sides, a teacher of the teacher's shape)."""

    def __init__(self, cross: Pair, root: Path, s_name: str, shape: dict, device: torch.device):
        self.cross, self.root, self.s_name, self.shape, self.device = cross, root, s_name, shape, device
        self._same: Pair | None = None

    @property
    def same(self) -> Pair:
        if self._same is None:
            teacher = build_model(self.root / "tokenizers" / self.s_name, self.shape, "teacher", seed=1)
            teacher.model.to(self.device)
            self._same = Pair(f"{self.s_name} -> {self.s_name}", teacher, self.cross.student, self.cross.records)
        return self._same

    def for_loss(self, name: str) -> Pair:
        return self.same if name in SAME_VOCABULARY else self.cross


def run_fused(losses, pairs: Pairs, shape: dict, dev: torch.device, warmup: int, repeats: int,
              overrides: list[str]) -> dict:
    """:func:`bench_fused` for each loss, on its pair (:class:`Pairs`)."""
    result = {"losses": {}}
    for name in losses:
        r = result["losses"][name] = bench_fused(name, pairs.for_loss(name), shape, dev, warmup, repeats, overrides)
        print(f"{name + ' fused':>16}: step {r['step_ms_fused']:9.1f} ms (unfused {r['step_ms_unfused']:.1f}, ratio "
              f"{r['ratio']:.2f})   from hidden states {r['peak_btv_fused']:.2f} B×T×V fp32 (unfused "
              f"{r['peak_btv_unfused']:.2f})   [{r['pair']}]", flush=True)
    return result


def run_peers(names, pairs: Pairs, shape: dict, dev: torch.device, warmup: int, repeats: int,
              overrides: list[str]) -> dict:
    """:mod:`prefkd.bench.peers`: the TRL rows on the same-vocabulary pair, the eager references on the cross pair."""
    from prefkd.bench.peers import run_reference_peers, run_trl_peers

    def preparer(pair_of):
        def prepare(name: str, extra: list[str]):
            pair = pair_of()
            loss = _prepared(name, pair, shape, dev, [*overrides, *extra])[:2]
            return (*loss, pair.student.model, pair.teacher.model)
        return prepare

    result = {**run_trl_peers(names, preparer(lambda: pairs.same), warmup, repeats, dev),
              **run_reference_peers(names, preparer(lambda: pairs.cross), warmup, repeats, dev)}
    for name, r in result.items():
        if "skipped" in r:
            print(f"{name + ' peer':>16}: skipped ({r['skipped']})", flush=True)
        else:
            print(f"{name + ' peer':>16}: ours {r['ms_ours']:.1f} ms / peer {r['ms_peer']:.1f} ms = "
                  f"{r['time_ratio']:.2f}; peak {r['peak_btv_ours']:.2f} / {r['peak_btv_peer']:.2f} B×T×V = "
                  f"{r['mem_ratio']:.2f}; values {r['value_ours']:.6g} / {r['value_peer']:.6g} (rel "
                  f"{r['value_rel_diff']:.1e}, grads {r['grad_rel_diff']:.1e}, agree {r['agree']})", flush=True)
    return result


def precompute_rate(pair: Pair, shape: dict, loss_overrides: list[str]) -> dict:
    """Examples per second of the losses' precompute hooks (MinED alignment, MCW-KD lexical cost)."""
    from prefkd.data.dataset import DistillDataset

    teacher, student, records = pair.teacher, pair.student, pair.records
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


def build_model(tokenizer_dir: Path, shape: dict, role: str, seed: int):
    """A random model of ``role`` ("student" / "teacher") with the shape's width, depth, heads and MLP size on the
    real tokenizer of ``tokenizer_dir`` (:func:`prefkd.models.tiny.build_shrunk`); the teacher frozen."""
    from prefkd.models.tiny import build_shrunk

    return build_shrunk(tokenizer_dir, hidden_size=shape[f"{role}_hidden"], num_layers=shape[f"{role}_layers"],
                        num_heads=shape[f"{role}_heads"], intermediate_size=shape[f"{role}_intermediate"] or None,
                        seed=seed, freeze=role == "teacher")


def run(losses, shape: dict, pair: str = "qwen_gpt2", device: str = "auto", warmup: int = 1, repeats: int = 3,
        precompute_examples: int = 200, sinkhorn: bool = True, loss_overrides: list[str] | None = None,
        fused=None, peers=(), fused_steps: bool = True) -> dict:
    """The whole benchmark (module docstring). ``fused``: the losses of the fused comparison (None: every fused loss,
    :func:`fused_losses`); ``peers``: the peers of :mod:`prefkd.bench.peers` to run."""
    from prefkd.data.preference import load_pairs
    from prefkd.data.records import read_jsonl

    dev = resolve_device(device)
    root = shared_dir()
    t_name, s_name = PAIRS[pair]
    teacher = build_model(root / "tokenizers" / t_name, shape, "teacher", seed=1)
    student = build_model(root / "tokenizers" / s_name, shape, "student", seed=2)
    teacher.model.to(dev)
    student.model.to(dev)
    all_records = read_jsonl(root / "data/instruct/dolly_dev.jsonl")
    records = sorted(all_records, key=lambda r: -len(r["prompt"]) - len(r["output"]))[:shape["batch"]]
    pairs_read = load_pairs(root / PREFERENCE_DATA, skip_invalid=True)
    preference = sorted(pairs_read, key=lambda p: -len(p.prompt) - len(p.chosen) - len(p.rejected))[:shape["batch"]]
    cross = Pair(f"{t_name} -> {s_name}", teacher, student, records, preference)
    pairs = Pairs(cross, root, s_name, shape, dev)
    overrides = list(loss_overrides or [])
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "pair": cross.name,
              "shape": {**shape, "student_vocab": len(student.tokenizer), "teacher_vocab": len(teacher.tokenizer)},
              "losses": {}}
    for name in losses:
        r = bench_loss(name, cross, shape, dev, warmup, repeats, overrides, fused_steps)
        result["losses"][name] = r
        print(f"{name:>16}: step {r['step_ms']:9.1f} ms   loss {r['loss_ms']:8.1f} ms   peak {r['peak_mem_mb']:8.1f} "
              f"MB   loss extra {r['loss_extra_btv']:.2f} B×T×V fp32{'   (fused)' if r['fused'] else ''}", flush=True)
    if "sft" in result["losses"]:
        base = result["losses"]["sft"]["step_ms"]
        for r in result["losses"].values():
            r["ratio_vs_sft"] = round(r["step_ms"] / base, 3)
    if fused is None:
        fused = fused_losses()
    if fused:
        result["fused_head"] = run_fused(fused, pairs, shape, dev, warmup, repeats, overrides)
    if peers:
        result["peers"] = run_peers(peers, pairs, shape, dev, warmup, repeats, overrides)
    if precompute_examples:
        result["precompute"] = precompute_rate(Pair(cross.name, teacher, student, all_records[:precompute_examples]),
                                               shape, overrides)
    if sinkhorn:
        try:
            from prefkd.ot.bench import benchmark
            result["sinkhorn"] = benchmark(device=dev.type, repeats=3)
        except ImportError:
            result["sinkhorn"] = "skipped (pip install pot)"
    return result


def parse_shape(text: str) -> tuple[dict, str | None]:
    """(shape, the preset's tokenizer pair or None) of ``--shape``: an optional preset name of :data:`PRESETS`
    first, then ``k=v`` overrides of its keys (or of :data:`DEFAULT_SHAPE`'s)."""
    shape, pair = dict(DEFAULT_SHAPE), None
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            if key not in PRESETS:
                raise SystemExit(f"--shape: unknown preset {key!r}; presets: {', '.join(PRESETS)}")
            preset = dict(PRESETS[key])
            pair = preset.pop("pair")
            shape.update(preset)
        elif key not in shape:
            raise SystemExit(f"--shape: unknown key {key!r}; keys: {', '.join(shape)}")
        else:
            shape[key] = int(value)
    return shape, pair


def _names(text: str | None, all_names) -> list[str] | None:
    """A comma-separated list ('all': ``all_names``; '' or 'none': empty)."""
    if text is None:
        return None
    if text.strip() == "all":
        return list(all_names)
    return [x for x in text.split(",") if x and x != "none"]


def main(argv: list[str] | None = None) -> None:
    from prefkd.bench.peers import PEERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default=",".join(DEFAULT_LOSSES),
                   help="comma-separated loss configs of the main table ('' skips it; sft is added as the baseline)")
    p.add_argument("--fused", default=None,
                   help="losses compared with fused output heads against built logits (default: every loss config "
                        "whose loss takes a fused head; '' skips them)")
    p.add_argument("--no-fused-steps", action="store_true",
                   help="main table: build every model's logits (trainer.fused_head=false) instead of fusing")
    p.add_argument("--peers", nargs="?", const="all", default="",
                   help=f"compare with peers (all, or some of {','.join(PEERS)})")
    p.add_argument("--shape", default="", help=f"[PRESET,]k=v,...; presets {', '.join(PRESETS)}; keys and defaults "
                                               f"{DEFAULT_SHAPE}")
    p.add_argument("--pair", default=None, choices=sorted(PAIRS), help="tokenizer pair (default: the preset's, else "
                                                                        "qwen_gpt2)")
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
    shape, preset_pair = parse_shape(args.shape)
    if args.pair and preset_pair and args.pair != preset_pair:
        raise SystemExit(f"--pair {args.pair}: the --shape preset is the {preset_pair} pair")
    losses = _names(args.losses, DEFAULT_LOSSES)
    if losses and "sft" not in losses:
        losses = ["sft", *losses]  # the baseline of ratio_vs_sft
    peers = _names(args.peers, PEERS)
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)}; peers: {', '.join(PEERS)}")
    result = run(losses, shape, args.pair or preset_pair or "qwen_gpt2", args.device, args.warmup, args.repeats,
                 args.precompute_examples, not args.no_sinkhorn, args.overrides, fused=_names(args.fused, ()),
                 peers=peers, fused_steps=not args.no_fused_steps)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json}")
