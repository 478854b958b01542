"""Dev ROUGE-L for checkpoint selection during training (docs/methods.md §9 "dev selection").

    dev_rougeL = (1/K) Σ_k  100 · mean_i  max_j F_LCS(ŷ_i^(k), r_ij)        K = num_samples (3)

where ŷ^(k) is a full sampled pass over the dev prompts with seed ``seed + k`` (docs/methods.md §9 sampling, but
no_repeat_ngram_size 0). The model may arrive in train mode, wrapped by peft or DDP: it is unwrapped,
switched to eval for the generation and put back into the mode it came in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefkd.data.records import to_instruction_record
from prefkd.eval.generation import Sampling, generate
from prefkd.eval.metrics import score_corpus
from prefkd.eval.sets import EvalExample


def _examples(records: Sequence[Mapping | EvalExample]) -> list[EvalExample]:
    out = []
    for i, r in enumerate(records):
        if isinstance(r, EvalExample):
            out.append(r)
            continue
        rec = to_instruction_record(dict(r), where=f"dev record {i}")
        refs = rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
        out.append(EvalExample(prompt=rec["prompt"], references=tuple(refs)))
    return out


def _unwrap(model):
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def dev_rouge(model, tokenizer, records: Sequence[Mapping | EvalExample], *, num_samples: int = 3,
              no_repeat_ngram_size: int = 0, batch_size: int = 8, max_new_tokens: int = 256, seed: int = 0,
              max_prompt_length: int = 256, progress: bool = False) -> float:
    """Mean ROUGE-L (×100) of ``num_samples`` sampled passes over ``records``.

    records: dicts with ``prompt`` (or ``instruction``/``input``) and ``output`` (a string or a list of
    references), or :class:`EvalExample`. The caller's RNG state and the model's train/eval mode are
    left as they were; the result depends only on (model, records, seed, settings).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1.")
    examples = _examples(records)
    if not examples:
        raise ValueError("dev_rouge needs at least one dev record.")
    model = _unwrap(model)
    sampling = Sampling(no_repeat_ngram_size=no_repeat_ngram_size, max_new_tokens=max_new_tokens,
                        max_prompt_length=max_prompt_length)
    prompts = [e.prompt for e in examples]
    references = [e.references for e in examples]
    was_training = model.training
    model.eval()
    try:
        scores = []
        for k in range(num_samples):
            gens = generate(model, tokenizer, prompts, sampling=sampling, batch_size=batch_size, seed=seed + k,
                            progress=progress, desc=f"dev ROUGE-L sample {k + 1}/{num_samples}")
            scores.append(score_corpus(gens.texts, references)["rougeL"])
    finally:
        model.train(was_training)
    return sum(scores) / len(scores)
