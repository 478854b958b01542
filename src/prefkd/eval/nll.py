"""Held-out NLL of the reference answers under teacher forcing, per evaluation set.

Each example j (prompt, answer; S-NI's first reference) is tokenised as in training
(:func:`prefkd.data.tokenize.tokenize_pair`: prompt and answer separately, no special tokens, the prompt cut to
its first ``max_prompt_length`` tokens, EOS appended, the whole cut to ``max_length``). Its label positions
L_j are the answer tokens and the EOS, and with y the labels of a set of examples j = 1..n:

    nll = Σ_j Σ_{i∈L_j} −log p(y_i | y_<i, prompt_j) / N_tokens            (nats per token, N_tokens = Σ_j |L_j|)
    bpb = Σ_j Σ_{i∈L_j} −log p(y_i | y_<i, prompt_j) / (ln 2 · N_bytes)    (bits per UTF-8 byte of the answers)

N_bytes counts ``len(answer.encode("utf-8"))``; an answer cut by ``max_length`` (counted in ``truncated``; its EOS
is then not scored) counts the bytes of its kept tokens, decoded. Per-token NLL is not comparable across
tokenizers (a coarser tokenizer spreads the same text over fewer, harder tokens); bits per byte of the same
text is. The EOS is scored, so this is the probability of the answer *as a complete response*; every tokenizer
scores exactly one EOS per answer, so it does not favour any of them.

``output_dir`` receives ``results.json`` (``sets.<s>.{nll, bpb, tokens, bytes, n, truncated}``,
``average.{nll, bpb}``: the mean over sets), ``results.md``, ``results.csv``, ``settings.json`` and per set
``<s>/examples.jsonl`` (prompt, nll_sum, tokens, bytes, truncated). Nothing is resumed: a rerun recomputes.

The examples of a set are batched longest first (little padding) and the rows are put back in file order; the
model builds logits only from the first answer position of a batch to its last (``logits_to_keep``), not before.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prefkd.data.dataset import collate
from prefkd.data.tokenize import TokenizedExample, tokenize_pair
from prefkd.eval.sets import EvalExample, load_eval_set, resolve_data_path
from prefkd.utils.io import atomic_write
from prefkd.utils.labels import IGNORE_INDEX

METRICS = ("nll", "bpb")


def forward_has(module, name: str) -> bool:
    """Whether ``module.forward`` has a parameter ``name`` (False when its signature cannot be read)."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def takes_logits_to_keep(model) -> bool:
    """Whether ``model`` can build only the logits ``logits_to_keep`` selects: its forward takes it (transformers'
    causal LMs), or that of the model behind a peft wrapper (which passes its keyword arguments on) does."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return forward_has(model, "logits_to_keep") or forward_has(inner, "logits_to_keep")


def scored_span(labels: torch.Tensor) -> tuple[int, int]:
    """(B, T) labels -> (lo, hi): the first labelled position of any row and one past the last (hi = lo: none)."""
    columns = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten().tolist()
    return (columns[0], columns[-1] + 1) if columns else (0, 0)


def span_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int,
                keep: bool) -> torch.Tensor:
    """(B, T) inputs -> the (B, hi − lo, V) logits at positions lo..hi−1.

    With ``keep`` the model builds only those (``logits_to_keep`` as a 1-D position tensor: transformers'
    ``slice_logits_to_keep`` applies it to every row before the output head); otherwise it builds all T and a view of
    hi − lo of them is returned (also when the model ignored ``logits_to_keep``)."""
    extra = {"logits_to_keep": torch.arange(lo, hi, device=input_ids.device)} if keep else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    if logits.shape[1] == hi - lo:
        return logits
    if logits.shape[1] != input_ids.shape[1]:
        raise ValueError(f"the model returned logits for {logits.shape[1]} positions; expected {hi - lo} "
                         f"(logits_to_keep) or {input_ids.shape[1]} (all).")
    return logits[:, lo:hi]


@torch.no_grad()
def nll_sums(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
             keep: bool | None = None) -> list[float]:
    """Σ −log p(label) over the non-ignored positions of each row: (B, T) tensors -> B sums (nats).

    The labels are already shifted (:mod:`prefkd.data.tokenize`: ``labels[:, i]`` is ``input_ids[:, i + 1]``, the
    target of ``logits[:, i]``), so only the K = hi − lo positions of :func:`scored_span` need logits: the model
    builds just those (B, K, V) when ``keep`` (default: :func:`takes_logits_to_keep`), not those of the prompts. The
    rows are scored one at a time in float32, so at most one (K, V) float32 temporary is added to the model's logits.
    """
    device = next(model.parameters()).device
    labels = labels.to(device)
    lo, hi = scored_span(labels)
    if hi == lo:  # nothing scored
        return [0.0] * labels.shape[0]
    keep = takes_logits_to_keep(model) if keep is None else keep
    logits = span_logits(model, input_ids.to(device), attention_mask.to(device), lo, hi, keep)
    labels = labels[:, lo:hi]
    return [F.cross_entropy(logits[b].float(), labels[b], ignore_index=IGNORE_INDEX, reduction="sum").item()
            for b in range(logits.shape[0])]


def longest_first(tokenized: Sequence[TokenizedExample]) -> list[int]:
    """Indices of ``tokenized`` by decreasing length (ties in file order): a batch pads little, and the longest
    batch comes first, so a memory problem shows at once."""
    return sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i].input_ids))


def answer_bytes(example: TokenizedExample, answer: str, tokenizer) -> int:
    """UTF-8 bytes of the answer text scored: all of it, or the decoded kept tokens when max_length cut it."""
    if not example.sequence_truncated:
        return len(answer.encode("utf-8"))
    return len(tokenizer.decode(example.response_ids).encode("utf-8"))


def score_set(model, tokenizer, examples: Sequence[EvalExample], *, batch_size: int, max_prompt_length: int,
              max_length: int, progress: bool = False, desc: str = "nll") -> list[dict]:
    """One record per example, in the order of ``examples``: ``prompt``, ``nll_sum`` (nats), ``tokens`` and ``bytes``
    scored, ``truncated``. The examples are tokenised first and batched longest first (:func:`longest_first`)."""
    tokenized = [tokenize_pair(e.prompt, e.references[0], tokenizer, max_prompt_length, max_length,
                               where=f"{desc} example {i}") for i, e in enumerate(examples)]
    order, keep = longest_first(tokenized), takes_logits_to_keep(model)  # checked once, not per batch
    sums = [0.0] * len(tokenized)  # in file order
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        index = order[start:start + batch_size]
        batch = collate([{"input_ids": tokenized[i].input_ids, "labels": tokenized[i].labels} for i in index],
                        tokenizer.pad_token_id)  # right-padded; labels -100 on padding
        for i, s in zip(index, nll_sums(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        keep=keep)):
            sums[i] = s
    return [{"prompt": e.prompt, "nll_sum": s, "tokens": len(t.response_ids),
             "bytes": answer_bytes(t, e.references[0], tokenizer), "truncated": t.sequence_truncated}
            for e, t, s in zip(examples, tokenized, sums)]


def summarize_set(rows: Sequence[dict]) -> dict:
    """Per-example records -> the set's ``nll`` (nats/token), ``bpb``, ``tokens``, ``bytes``, ``n``, ``truncated``."""
    total = math.fsum(r["nll_sum"] for r in rows)
    tokens, nbytes = sum(r["tokens"] for r in rows), sum(r["bytes"] for r in rows)
    return {"nll": total / tokens, "bpb": total / (math.log(2) * nbytes), "tokens": tokens, "bytes": nbytes,
            "n": len(rows), "truncated": sum(r["truncated"] for r in rows)}


def to_markdown(results: dict) -> str:
    """One row per set, then Avg. (the mean over sets)."""
    limit = results.get("limit")
    adapter = f" + adapter {results['adapter']}" if results.get("adapter") else ""
    lines = [f"# {results.get('model', 'model')}{adapter}",
             "",
             "Held-out NLL of the reference answers (+ EOS): nats per token and bits per UTF-8 byte"
             + (f"; first {limit} examples per set." if limit else "; all examples."),
             "",
             "| set | nll | bpb | n |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {s['nll']:.4f} | {s['bpb']:.4f} | {s['n']} |" for name, s in results["sets"].items()]
    avg = results["average"]
    lines.append(f"| Avg. | {avg['nll']:.4f} | {avg['bpb']:.4f} | {sum(s['n'] for s in results['sets'].values())} |")
    return "\n".join(lines) + "\n"


def to_csv(results: dict) -> str:
    """One row per set, then ``average`` (mean over sets of nll and bpb; totals of the counts)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    columns = ["nll", "bpb", "tokens", "bytes", "n", "truncated"]
    w.writerow(["set", *columns])
    for name, s in results["sets"].items():
        w.writerow([name, f"{s['nll']:.6f}", f"{s['bpb']:.6f}", *(s[c] for c in columns[2:])])
    avg = results["average"]
    w.writerow(["average", f"{avg['nll']:.6f}", f"{avg['bpb']:.6f}",
                *(sum(s[c] for s in results["sets"].values()) for c in columns[2:])])
    return buf.getvalue()


def evaluate_nll(model, tokenizer, sets: Mapping[str, str | Path], output_dir: str | Path, *, batch_size: int = 8,
                 limit: int | None = None, max_prompt_length: int = 256, max_length: int = 1024,
                 progress: bool = True, model_name: str = "", adapter: str | None = None) -> dict:
    """Score the reference answers of ``sets`` (name -> JSONL path); write the files and return results.json's
    content (see the module docstring)."""
    if not sets:
        raise ValueError("give at least one evaluation set.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    output_dir = Path(output_dir)
    data = {name: load_eval_set(path, limit) for name, path in sets.items()}  # validate every file first
    settings = {"model": model_name, "adapter": adapter, "limit": limit, "batch_size": batch_size,
                "max_prompt_length": max_prompt_length, "max_length": max_length}
    atomic_write(output_dir / "settings.json", json.dumps(settings, indent=2) + "\n")
    start = time.time()
    model.eval()
    per_set = {}
    for name, examples in data.items():
        rows = score_set(model, tokenizer, examples, batch_size=batch_size, max_prompt_length=max_prompt_length,
                         max_length=max_length, progress=progress, desc=name)
        atomic_write(output_dir / name / "examples.jsonl",
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        per_set[name] = summarize_set(rows)
    average = {"sets": list(per_set), **{m: statistics.fmean(s[m] for s in per_set.values()) for m in METRICS}}
    results = {"protocol": "nll", **settings,
               "files": {n: str(resolve_data_path(p).resolve()) for n, p in sets.items()},
               "sets": per_set, "average": average, "wall_time_s": time.time() - start}
    atomic_write(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(output_dir / "results.md", to_markdown(results))
    atomic_write(output_dir / "results.csv", to_csv(results))
    return results
