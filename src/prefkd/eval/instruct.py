"""The instruction-set protocol of docs/methods.md §9, resumable.

For every set s and seed S the generations go to ``DIR/<s>/seed<S>.jsonl``, one record per example:
``prompt``, ``references`` (a list), ``generation``, ``num_tokens``, ``rougeL`` and ``exact_match`` (×100).
Each file is written atomically once its (set, seed) is complete, so a file that exists is finished; a
rerun into the same DIR reuses it when its prompts and references are those of the set (same ``limit``)
and generates only the missing pairs. ``DIR/settings.json`` pins the model and decoding settings: a rerun
with different ones is refused instead of mixing generations.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from prefkd.eval.generation import Sampling, generate
from prefkd.eval.metrics import exact_match, rouge_l
from prefkd.eval.report import summarize, write_results
from prefkd.eval.sets import EvalExample, load_eval_set, resolve_data_path
from prefkd.utils.io import atomic_write

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (10, 20, 30, 40, 50)


def generation_file(output_dir: Path, set_name: str, seed: int) -> Path:
    return Path(output_dir) / set_name / f"seed{seed}.jsonl"


def read_finished(path: Path, examples: Sequence[EvalExample]) -> list[dict] | None:
    """The records of a finished generation file, or None when it is missing or belongs to other examples."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    same = len(rows) == len(examples) and all(
        r.get("prompt") == e.prompt and tuple(r.get("references", ())) == e.references and "generation" in r
        for r, e in zip(rows, examples))
    if not same:
        log.warning("%s holds %d records that are not this set's first %d examples: generating it again",
                    path, len(rows), len(examples))
        return None
    return rows


def score_rows(rows: Sequence[dict]) -> dict:
    """Per-(set, seed) figures from generation records: rougeL and exact_match (×100), n, gen_len_mean."""
    n = len(rows)
    return {"rougeL": 100.0 * sum(rouge_l(r["generation"], r["references"]) for r in rows) / n,
            "exact_match": 100.0 * sum(exact_match(r["generation"], r["references"]) for r in rows) / n,
            "n": n,
            "gen_len_mean": sum(r.get("num_tokens", 0) for r in rows) / n}


def check_settings(output_dir: Path, settings: dict) -> None:
    """Write DIR/settings.json, or refuse to resume into a DIR made with different model/decoding settings."""
    path = output_dir / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
            raise ValueError(f"{output_dir} holds generations made with other settings (old, new): {diff}. "
                             f"Use another output_dir, or delete it to start over.")
        return
    atomic_write(path, json.dumps(settings, indent=2) + "\n")


def run_set_seed(model, tokenizer, examples: Sequence[EvalExample], *, sampling: Sampling, batch_size: int,
                 seed: int, desc: str, progress: bool) -> list[dict]:
    """Generate one (set, seed) and return its records."""
    gens = generate(model, tokenizer, [e.prompt for e in examples], sampling=sampling, batch_size=batch_size,
                    seed=seed, progress=progress, desc=desc)
    return [{"prompt": e.prompt, "references": list(e.references), "generation": text, "num_tokens": n,
             "rougeL": 100.0 * rouge_l(text, e.references), "exact_match": 100.0 * exact_match(text, e.references)}
            for e, text, n in zip(examples, gens.texts, gens.num_tokens)]


def evaluate_instruct(model, tokenizer, sets: Mapping[str, str | Path], output_dir: str | Path, *,
                      seeds: Sequence[int] = DEFAULT_SEEDS, batch_size: int = 8, limit: int | None = None,
                      sampling: Sampling | None = None, progress: bool = True, model_name: str = "",
                      adapter: str | None = None) -> dict:
    """Evaluate on ``sets`` (name -> JSONL path) with every seed; write the generation files and the results.

    Returns the results.json content: ``sets.<s>.seeds.<S>.{rougeL, exact_match, n, gen_len_mean}``,
    ``sets.<s>.{rougeL,exact_match,gen_len}_{mean,std}``, ``average.{rougeL,exact_match}_{mean,std}``.
    """
    sampling = sampling or Sampling()
    output_dir = Path(output_dir)
    seeds = [int(s) for s in seeds]
    if not seeds or not sets:
        raise ValueError("give at least one evaluation set and one seed.")
    data = {name: load_eval_set(path, limit) for name, path in sets.items()}  # validate every file first
    check_settings(output_dir, {"model": model_name, "adapter": adapter, "sampling": asdict(sampling)})
    start = time.time()
    model.eval()
    per_seed: dict[str, dict[int, dict]] = {}
    generated = reused = 0
    for name, examples in data.items():
        per_seed[name] = {}
        for seed in seeds:
            path = generation_file(output_dir, name, seed)
            rows = read_finished(path, examples)
            if rows is None:
                rows = run_set_seed(model, tokenizer, examples, sampling=sampling, batch_size=batch_size, seed=seed,
                                    desc=f"{name} seed {seed}", progress=progress)
                atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                generated += 1
            else:
                reused += 1
            per_seed[name][seed] = score_rows(rows)
            log.info("%s seed %d: ROUGE-L %.2f, EM %.2f (%d examples)", name, seed,
                     per_seed[name][seed]["rougeL"], per_seed[name][seed]["exact_match"], len(rows))
    results = {"model": model_name, "adapter": adapter, "seeds": seeds, "limit": limit, "batch_size": batch_size,
               "sampling": asdict(sampling), "files": {n: str(resolve_data_path(p).resolve()) for n, p in sets.items()},
               **summarize(per_seed),
               "generated_pairs": generated, "reused_pairs": reused, "wall_time_s": time.time() - start}
    write_results(output_dir, results)
    return results
