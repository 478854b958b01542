"""On-policy distillation (GKD's λ, docs/methods.md §13): a step's responses replaced by the student's own samples.

Every ``every``-th optimizer step s tosses a coin u ~ U(0, 1) seeded by (trainer.seed, s). When u < λ
(``trainer.on_policy.fraction``), each micro-batch of the step is rebuilt from the student's samples:

1. **Prompts.** Row i keeps its example's prompt, as the dataset tokenised it for each side: ``input_ids[:p]`` and
   ``teacher_input_ids[:p_T]`` (p = the prompt length, one more than the leading -100 labels).
2. **Sampling.** The student (eval mode, no grad, KV cache) samples at most ``max_new_tokens`` tokens per prompt,
   batched and left-padded (:mod:`prefkd.eval.generation`), at ``temperature`` (0: greedy) and ``top_p``. The torch
   RNG is seeded by (seed, s, process, micro-batch) inside ``torch.random.fork_rng``: a step's samples depend on
   nothing else, so a resumed run draws the same ones, and the training RNG (dropout) is untouched.
3. **The response** is the sampled tokens before the first stop token (EOS, the generation config's EOS, or pad).
   ``ended``: a stop token came; then EOS is the last label, as in the dataset. A response cut by
   ``max_new_tokens`` (or by ``dataset.max_length``) gets no EOS label. An empty response that ended is the
   prompt and EOS: the teacher says whether to stop there.
4. **Student side: the student's own token ids** (what it sampled; exact on-policy log-probabilities).
5. **Teacher side: the same string.** The response ids are decoded to text (no special tokens skipped, no clean-up)
   and tokenised for the teacher exactly as the dataset tokenises an output (:func:`prefkd.data.tokenize.encode`,
   then :func:`~prefkd.data.tokenize.build_example`). When the two models share a vocabulary, the teacher reads the
   student's ids instead (one tokenisation, as GKD: same-vocabulary KD compares the same positions).
6. **Alignments.** The dataset's :meth:`~prefkd.data.dataset.DistillDataset.make_example` runs the loss's precompute
   hook (MinED alignment, lexical cost) on the new pair, and the dataset's collate pads the micro-batch: nothing
   computed for the dataset's own response is reused.

A row whose text the teacher cannot tokenise (a cut response that decodes to nothing) keeps its dataset response
(counted as ``fallback_rows``).

Which losses can train on samples: those scored by a teacher, token by token (kd, uld, minedit, dskd, dskd_cma,
multilevel_ot, mcw_kd, mcw_kd_dual). SFT has no teacher; the preference losses train on pairs. Both are refused at
start by :func:`check_on_policy`, as is a teacher cache (it holds the teacher's states for the dataset's responses).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

import torch

from prefkd.data.dataset import DistillDataset
from prefkd.data.tokenize import build_example, encode
from prefkd.eval.generation import Sampling, sample_tokens, stop_token_ids
from prefkd.training.loader import Collate
from prefkd.utils.labels import IGNORE_INDEX

__all__ = ["OnPolicySampler", "OnPolicySettings", "SampledStep", "check_on_policy", "step_seed"]


@dataclass(frozen=True)
class OnPolicySettings:
    """``trainer.on_policy`` (config/trainer/default.yaml)."""

    fraction: float = 0.0      # λ: probability that a step trains on the student's samples
    temperature: float = 1.0   # sampling temperature (0: greedy)
    top_p: float = 1.0         # nucleus sampling
    max_new_tokens: int = 128  # sampled tokens per response at most
    every: int = 1             # the coin is tossed every N optimizer steps; other steps train on the dataset

    @classmethod
    def from_config(cls, node) -> OnPolicySettings:
        """Read and check ``trainer.on_policy`` (None: off); a wrong value names its key and the accepted range."""
        values = dict(node or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"trainer.on_policy.{unknown[0]}: unknown key; the keys are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        settings = cls(**values)

        def number(v, whole=False) -> bool:
            return isinstance(v, int if whole else (int, float)) and not isinstance(v, bool)

        s = settings
        checks = [("fraction", number(s.fraction) and 0 <= s.fraction <= 1, "a probability in [0, 1] (0 = off)"),
                  ("temperature", number(s.temperature) and s.temperature >= 0, "a number ≥ 0 (0 = greedy)"),
                  ("top_p", number(s.top_p) and 0 < s.top_p <= 1, "a number in (0, 1]"),
                  ("max_new_tokens", number(s.max_new_tokens, whole=True) and s.max_new_tokens >= 1, "an integer ≥ 1"),
                  ("every", number(s.every, whole=True) and s.every >= 1, "an integer ≥ 1")]
        for key, ok, accepted in checks:
            if not ok:
                raise ValueError(f"trainer.on_policy.{key}={getattr(s, key)!r}: must be {accepted}")
        return settings

    @property
    def active(self) -> bool:
        return self.fraction > 0

    def sampling(self) -> Sampling:
        """The generation settings: pure temperature / top-p sampling (no top-k, no n-gram block)."""
        return Sampling(do_sample=self.temperature > 0, temperature=self.temperature or 1.0, top_p=self.top_p,
                        top_k=0, no_repeat_ngram_size=0, max_new_tokens=self.max_new_tokens)


def check_on_policy(settings: OnPolicySettings, loss, loss_target: str, teacher_cache=None) -> None:
    """Refuse, before any model loads, what cannot train on samples: a loss without a teacher (sft), the
    preference losses (pairs, a reference model), and a teacher cache."""
    if not settings.active:
        return
    needs = loss.needs
    if needs.pairs or needs.reference is not None:
        raise ValueError(f"trainer.on_policy.fraction={settings.fraction}: loss {loss_target} trains on preference "
                         f"pairs (chosen and rejected responses), which the student's samples are not; on-policy "
                         f"training serves the token-level distillation losses (kd, uld, minedit, dskd, dskd_cma, "
                         f"multilevel_ot, mcw_kd, mcw_kd_dual). Set trainer.on_policy.fraction=0")
    if not needs.teacher:
        raise ValueError(f"trainer.on_policy.fraction={settings.fraction}: loss {loss_target} has no teacher to "
                         f"score the student's samples (SFT on its own samples teaches it nothing new); pick a "
                         f"distillation loss (kd, uld, minedit, dskd, dskd_cma, multilevel_ot, mcw_kd) or set "
                         f"trainer.on_policy.fraction=0")
    if teacher_cache is not None:
        raise ValueError(f"trainer.on_policy.fraction={settings.fraction} with trainer.teacher_cache: the cache "
                         f"holds the teacher's outputs for the dataset's responses, not for the student's samples; "
                         f"drop trainer.teacher_cache (the teacher runs live) or set trainer.on_policy.fraction=0")


def step_seed(*parts) -> int:
    """A 63-bit seed from any values (seed, kind, step, process, micro-batch), stable across runs and machines."""
    digest = hashlib.sha256("/".join(map(str, ("prefkd-on-policy", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def prompt_length(labels: torch.Tensor) -> int:
    """Prompt tokens of one example: one more than its leading -100 labels (docs/methods.md §1)."""
    answered = labels.ne(IGNORE_INDEX).nonzero()
    return int(answered[0]) + 1 if len(answered) else len(labels) + 1


@dataclass
class SampledStep:
    """What sampling cost in one step: seconds in ``generate``, response tokens sampled, rows, fallback rows."""

    seconds: float = 0.0
    tokens: int = 0
    rows: int = 0
    fallback_rows: int = 0

    def add(self, other: SampledStep) -> None:
        self.seconds += other.seconds
        self.tokens += other.tokens
        self.rows += other.rows
        self.fallback_rows += other.fallback_rows


class OnPolicySampler:
    """Rebuilds micro-batches of :class:`~prefkd.data.dataset.DistillDataset` examples from the student's samples
    (see the module docstring). ``collate``: the training loader's :class:`~prefkd.training.loader.Collate`."""

    def __init__(self, settings: OnPolicySettings, *, seed: int, dataset: DistillDataset, collate: Collate,
                 device: torch.device):
        if dataset.teacher_tokenizer is None:
            raise ValueError("on-policy training needs the teacher's tokenizer in the training data")
        self.settings, self.seed, self.dataset, self.collate, self.device = settings, seed, dataset, collate, device
        self.tokenizer, self.teacher_tokenizer = dataset.student_tokenizer, dataset.teacher_tokenizer
        self.same_vocab = self.tokenizer.get_vocab() == self.teacher_tokenizer.get_vocab()
        self.sampling = settings.sampling()

    def wants(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based: the step about to run) trains on samples; the same on every
        process, from the seed and the step alone."""
        s = self.settings
        if not s.active or step % s.every:
            return False
        return random.Random(step_seed(self.seed, "coin", step)).random() < s.fraction

    # ------------------------------------------------------------------ one micro-batch
    def sample_batch(self, model, batch: dict, *, step: int, process: int, micro: int) -> tuple[dict, SampledStep]:
        """The micro-batch ``batch`` (collated, on the CPU, with ``example_index``) rebuilt from ``model``'s samples
        to its prompts."""
        indices = batch["example_index"].tolist()
        examples = [self.dataset[i] for i in indices]
        prompts = [ex["input_ids"][:prompt_length(ex["labels"])].tolist() for ex in examples]
        t0 = time.perf_counter()
        responses, ended = self._generate(model, prompts, step_seed(self.seed, "sample", step, process, micro))
        stats = SampledStep(seconds=time.perf_counter() - t0, tokens=sum(map(len, responses)), rows=len(indices))
        items = []
        for i, example, prompt, response, end in zip(indices, examples, prompts, responses, ended):
            rebuilt = self._example(i, example, prompt, response, end)
            stats.fallback_rows += rebuilt is None
            items.append((i, rebuilt if rebuilt is not None else example))
        return self.collate(items), stats

    def _generate(self, model, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], list[bool]]:
        """Per prompt the sampled response ids (before the first stop token) and whether a stop token came."""
        new, lengths = sample_tokens(model, prompts, sampling=self.sampling, seed=seed,
                                     pad_id=self.tokenizer.pad_token_id, stops=stop_token_ids(model, self.tokenizer),
                                     device=self.device)
        return [row[:n].tolist() for row, n in zip(new, lengths)], [n < new.shape[1] for n in lengths]

    def _example(self, index: int, example: dict, prompt: list[int], response: list[int], ended: bool) -> dict | None:
        """Both sides' example of one sampled response (None: the teacher side would be empty and cut)."""
        ds = self.dataset
        room = ds.max_length - len(prompt)  # tokens after the prompt that fit in max_length, EOS included
        if len(response) + ended > room:
            response, ended = response[:room], False
        record = ds.records[index]
        student = build_example(prompt, response, ds.end_id(record, "student"), ds.max_prompt_length, ds.max_length,
                                ended=ended, allow_empty=True)
        text = self.tokenizer.decode(response, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        teacher_ids = example["teacher_input_ids"]
        teacher_prompt = teacher_ids[:prompt_length(example["teacher_labels"])].tolist()
        if self.same_vocab:
            teacher_response = response
        else:
            teacher_response = encode(self.teacher_tokenizer, [text])[0] if text else []
        if not teacher_response and not ended:
            return None
        teacher = build_example(teacher_prompt, teacher_response, ds.end_id(record, "teacher"),
                                ds.max_prompt_length, ds.max_length, ended=ended, allow_empty=True)
        record = {**ds.records[index], "output": text}
        return ds.make_example(record, student, teacher, f"the student's sample for {ds.source} record {index}")
