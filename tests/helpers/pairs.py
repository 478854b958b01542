"""Teacher/student pairs and the loss inputs built from them: a fake model (embeddings and head only), leaves,
the embedded tiny pair and the real tokenizer pairs (tiny shrunk models) with their batches, synthetic
cross-tokenizer tensors, real forward passes, and Dolly records."""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from prefkd.data.dataset import DistillDataset
from prefkd.data.embedded import generate_records
from prefkd.data.records import read_jsonl
from prefkd.losses.base import LossInputs, ModelOutputs
from prefkd.models.tiny import build_shrunk, build_tiny
from tests.helpers.shared import shared_dir


# ---------------------------------------------------------------------------------------------- fake models and leaves
class FakeLM(nn.Module):
    """Only what the losses read from a model: an input-embedding table and an output head."""

    def __init__(self, vocab: int, hidden: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=g))
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=g))

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------- tiny and real pairs
@cache
def real_pair(pair: tuple[str, str]):
    """(teacher bundle, student bundle, records): tiny random models with the real vocabularies and tokenizers
    (sized from shared/tokenizers/*/config.json), and 3 Dolly dev records."""
    teacher, student = pair
    root = shared_dir()
    t = build_shrunk(root / "tokenizers" / teacher, hidden_size=32, num_layers=1, num_heads=2, seed=1, freeze=True)
    s = build_shrunk(root / "tokenizers" / student, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    return t, s, read_jsonl(root / "data/instruct/dolly_dev.jsonl")[:3]


@cache
def tiny_pair():
    """The embedded tiny pair of model=tiny (teacher tokenizer "a", student "b") and 4 embedded records."""
    t = build_tiny("a", "llama", hidden_size=32, num_layers=1, num_heads=2, seed=1, freeze=True)
    s = build_tiny("b", "gpt2", hidden_size=32, num_layers=1, num_heads=2, seed=2)
    return t, s, generate_records(4, seed=3)


def pair_batch(bundles, precompute=None, version="1", max_prompt_length=24, max_length=64):
    """(batch, student logits as a leaf, teacher logits) for a pair of bundles on their records."""
    t, s, records = bundles
    ds = DistillDataset(records, s.tokenizer, t.tokenizer, max_prompt_length=max_prompt_length,
                        max_length=max_length, precompute=precompute, precompute_version=version, use_cache=False)
    batch = ds.collate(list(ds), s.tokenizer.pad_token_id, t.tokenizer.pad_token_id)
    with torch.no_grad():
        t_logits = t.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
        s_logits = s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return batch, s_logits.float() * 8, t_logits.float() * 8  # × 8: sharper distributions than random init's


def inputs_of(batch, s_logits, t_logits) -> LossInputs:
    return LossInputs(batch=batch, student=ModelOutputs(logits=s_logits.detach().clone().requires_grad_(True)),
                      teacher=ModelOutputs(logits=t_logits))


# ---------------------------------------------------------------------------------------------- synthetic inputs
def synthetic(seed=0, B=4, n=9, m=12, V_s=13, V_t=17):
    """Different prompt and response lengths per side: teacher longer (b=0), student longer (b=1), one teacher
    response empty (b=2), right padding (b=3)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V_s, (B, n), generator=g)
    t_labels = torch.randint(0, V_t, (B, m), generator=g)
    labels[0, :5], t_labels[0, :3] = -100, -100
    labels[1, :2], t_labels[1, :8] = -100, -100
    labels[2, :3], t_labels[2, :] = -100, -100
    labels[3, :1], labels[3, 6:], t_labels[3, :4], t_labels[3, 9:] = -100, -100, -100, -100
    batch = {"labels": labels, "teacher_labels": t_labels}
    return batch, torch.randn(B, n, V_s, generator=g) * 3, torch.randn(B, m, V_t, generator=g) * 3


def cross_inputs(B=3, n=9, m=12, V_s=5, V_t=9, d_s=6, d_t=8, seed=0):
    """Random leaves for two tokenizations of B sequences: different lengths, prompts and padding per side."""
    g = torch.Generator().manual_seed(seed)

    def side(T, V, prompts, lengths):
        ids, labels = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
        attention = torch.ones(B, T, dtype=torch.long)
        for i, (p, L) in enumerate(zip(prompts, lengths)):
            labels[i, :p], labels[i, L:], ids[i, L:], attention[i, L:] = -100, -100, V - 1, 0
        return ids, labels, attention

    ids, labels, att = side(n, V_s, [2, 3, 1], [n, n - 3, n - 1])
    t_ids, t_labels, t_att = side(m, V_t, [4, 2, 3], [m - 2, m, m - 4])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": att, "teacher_input_ids": t_ids,
             "teacher_labels": t_labels, "teacher_attention_mask": t_att}
    student, teacher = FakeLM(V_s, d_s, seed + 1), FakeLM(V_t, d_t, seed + 2)
    s = ModelOutputs(leaf(torch.randn(B, n, V_s, generator=g) * 2), leaf(torch.randn(B, n, d_s, generator=g)), student)
    t = ModelOutputs(torch.randn(B, m, V_t, generator=g) * 2, torch.randn(B, m, d_t, generator=g) * 3, teacher)
    return LossInputs(batch=batch, student=s, teacher=t)


# ---------------------------------------------------------------------------------------------- real forward passes
def model_inputs(student, teacher, records, max_prompt_length=24, max_length=48, precompute=None,
                 precompute_version="1") -> LossInputs:
    """Both models' real forward passes on a collated batch (built with a loss's ``precompute`` hook, if given);
    the student's logits and hidden states become fresh leaves."""
    from prefkd.data.dataset import DistillDataset

    ds = DistillDataset(records, student.tokenizer, teacher.tokenizer, max_prompt_length=max_prompt_length,
                        max_length=max_length, precompute=precompute, precompute_version=precompute_version,
                        use_cache=False)
    batch = ds.collate([ds[i] for i in range(len(ds))], student.tokenizer.pad_token_id,
                       teacher.tokenizer.pad_token_id)
    with torch.no_grad():
        so = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True)
        to = teacher.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                           output_hidden_states=True)
    return LossInputs(batch=batch, student=ModelOutputs(leaf(so.logits), leaf(so.hidden_states[-1]), student.model),
                      teacher=ModelOutputs(to.logits, to.hidden_states[-1], teacher.model))


def dolly_records(shared, k=3) -> list[dict]:
    import json

    lines = (shared / "data/instruct/dolly_dev.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:k]]
