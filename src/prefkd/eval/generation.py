"""Batched, left-padded sampling with the docs/methods.md §9 settings, reproducible from a seed.

Each prompt is tokenised without special tokens (docs/methods.md §1: no BOS) and cut to its first
``max_prompt_length`` (256) tokens, as in training. A batch of B prompts becomes

    input_ids, attention_mask: (B, T)   left-padded with pad_token_id (T = longest prompt of the batch)

and ``model.generate`` samples at most ``max_new_tokens`` tokens after position T. Before batch b the
torch RNG is seeded with ``batch_seed(seed, b)``, inside ``torch.random.fork_rng`` so the caller's RNG
state (a training run's) is untouched: the same (seed, prompts, batch_size) give the same text whatever
ran before. The new tokens are decoded with ``skip_special_tokens`` and stripped.

:func:`generate` returns every continuation at once; :func:`generate_batches` yields them batch by batch from
any start batch, with the same seeds (a resumable writer such as ``python -m prefkd.generate``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from prefkd.data.chat import end_of_turn_id
from prefkd.data.records import DataError


@dataclass
class Sampling:
    """Decoding settings; the defaults are exactly docs/methods.md §9 (dev selection uses no_repeat_ngram_size=0)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = no top-k filtering
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256
    max_prompt_length: int = 256        # prompt tokens kept
    # "right" keeps the first tokens (docs/methods.md §1); "left" the last (dialogues)
    truncation_side: str = "right"

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``. Penalties that a model's own generation_config might
        set are pinned to their neutral values so that only these settings decide the sample."""
        kw = asdict(self)
        kw.pop("max_prompt_length"), kw.pop("truncation_side")
        if not self.do_sample:
            kw.pop("temperature"), kw.pop("top_p"), kw.pop("top_k")
        return {**kw, "num_beams": 1, "repetition_penalty": 1.0, "typical_p": 1.0, "use_cache": True}


@dataclass
class Generations:
    """``texts[i]``: the decoded, stripped continuation of prompt i; ``num_tokens[i]``: its length in
    tokens up to (not including) the first EOS or pad token."""

    texts: list[str]
    num_tokens: list[int]


def batch_seed(seed: int, batch_index: int) -> int:
    """The RNG seed of one batch: distinct for every (seed, batch index) with batch_index < 1,000,003."""
    return (int(seed) * 1_000_003 + int(batch_index)) % (2 ** 63)


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int,
                   truncation_side: str = "right") -> list[list[int]]:
    """Token ids of each prompt, no special tokens, cut to ``max_prompt_length`` tokens: the first ones
    (``truncation_side="right"``) or the last ones (``"left"``)."""
    if truncation_side not in ("right", "left"):
        raise ValueError(f"truncation_side={truncation_side!r} must be 'right' or 'left'.")
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if truncation_side == "left":
        return [row[-max_prompt_length:] if max_prompt_length else [] for row in ids]
    return [row[:max_prompt_length] for row in ids]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input_ids and attention_mask, padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS, any EOS of the model's generation_config (e.g. several chat end tokens) and, when the
    tokenizer has a chat template, the token that ends an assistant turn in it (:func:`prefkd.data.chat.end_of_turn_id`:
    what a model trained on conversations learnt to stop with)."""
    ids = {tokenizer.eos_token_id}
    if getattr(tokenizer, "chat_template", None):
        try:
            ids.add(end_of_turn_id(tokenizer))
        except DataError:  # a template that cannot render the probe conversation: its end is unknown
            pass
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def generate_batches(model, tokenizer, prompts: Sequence[str], *, sampling: Sampling | None = None,
                     batch_size: int = 8, seed: int = 0, start_batch: int = 0) -> Iterator[tuple[int, Generations]]:
    """Sample batch by batch: yield ``(b, Generations of prompts[b*batch_size:(b+1)*batch_size])`` for b from
    ``start_batch`` on. Batch b is seeded with ``batch_seed(seed, b)`` whatever ran before it, so starting at
    ``start_batch`` gives exactly the batches a run from 0 gives there (resuming). Eval mode is the caller's."""
    sampling = sampling or Sampling()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    first = start_batch * batch_size
    encoded = encode_prompts(tokenizer, prompts[first:], sampling.max_prompt_length, sampling.truncation_side)
    for b, start in enumerate(range(0, len(encoded), batch_size), start=start_batch):
        yield b, _sample_batch(model, tokenizer, encoded[start:start + batch_size], sampling=sampling,
                               seed=batch_seed(seed, b), pad_id=pad_id, stops=stops, device=device)


@torch.no_grad()
def sample_tokens(model, rows: Sequence[Sequence[int]], *, sampling: Sampling, seed: int, pad_id: int,
                  stops: list[int], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """One left-padded batch of prompt ids sampled under ``torch.manual_seed(seed)``, the caller's RNG state
    untouched: the (B, N) new token ids (on the CPU) and each row's length up to (not including) its first stop or
    pad token (N when none came: the row was cut by ``max_new_tokens``)."""
    ids, mask = left_pad(rows, pad_id)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type if rng_devices else "cuda"):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_id,
                             eos_token_id=stops, **sampling.generate_kwargs())
    new = out[:, ids.shape[1]:].cpu()
    is_stop = torch.isin(new, torch.tensor(stops + [pad_id]))
    return new, (is_stop.cumsum(dim=1) == 0).sum(dim=1).tolist()


def _sample_batch(model, tokenizer, rows: Sequence[Sequence[int]], *, sampling: Sampling, seed: int, pad_id: int,
                  stops: list[int], device: torch.device) -> Generations:
    """One batch's continuations, decoded with ``skip_special_tokens`` and stripped."""
    new, n_new = sample_tokens(model, rows, sampling=sampling, seed=seed, pad_id=pad_id, stops=stops, device=device)
    texts = [t.strip() for t in tokenizer.batch_decode([row[:n] for row, n in zip(new, n_new)],
                                                        skip_special_tokens=True)]
    return Generations(texts=texts, num_tokens=n_new)


def generate(model, tokenizer, prompts: Sequence[str], *, sampling: Sampling | None = None, batch_size: int = 8,
             seed: int = 0, progress: bool = True, desc: str = "generating") -> Generations:
    """Sample one continuation per prompt, in order. The model should be in eval mode (callers switch)."""
    batches = generate_batches(model, tokenizer, prompts, sampling=sampling, batch_size=batch_size, seed=seed)
    texts, lengths = [], []
    total = math.ceil(len(prompts) / batch_size) if batch_size >= 1 else 0
    for _, gens in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
        texts += gens.texts
        lengths += gens.num_tokens
    return Generations(texts=texts, num_tokens=lengths)
