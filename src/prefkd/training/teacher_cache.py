"""Offline teacher cache: run the teacher once, store its top-k log-probabilities (or last hidden states), and train
every run on the same data from it.

    python -m prefkd.teacher_cache model=... [teacher=...] [dataset=...] cache.dir=DIR cache.top_k=K
    python -m prefkd.train model=... loss=kd trainer.teacher_cache=DIR        # no teacher model loaded

Format of DIR: ``manifest.json`` (format, teacher name, store, top_k, vocabulary size, per split the fingerprint of
the token ids, :attr:`prefkd.data.dataset.DistillDataset.token_key`, which every loss on the same data shares, the
number of examples and the shard files),
``tokenizer/`` (the teacher tokenizer, which the data pipeline still needs), and per split shards
``<split>-NNNNN.safetensors`` holding, for ``shard_size`` examples in dataset order, ``logp`` (positions × k, fp32,
the teacher's log-probabilities log softmax(z^t) of its top-k tokens, sorted), ``index`` (positions × k, int32) and
``offsets`` (n + 1, int64: example i owns rows offsets[i]:offsets[i+1], one per teacher input position).

``cache.store=hidden`` stores instead the teacher's last hidden state h (``hidden_states[-1]``, positions × d, fp32,
key ``hidden``) at every position. The teacher model is still loaded, for its output head and embeddings, but its body
never runs: the logits are head(h), checked against the live logits when the cache is built (a model whose logits are
not its head applied to h, e.g. with soft-capping, is refused). Every distillation loss, those that read the
teacher's hidden states included (dskd, dskd_cma, mcw_kd), trains from it, and the loss equals the live loss to float
precision (the cache's batches are padded otherwise than a run's, which moves h by ~1e-7 relative). It saves the
teacher's forward pass (all but the head) in every run: ``run_train/demo_table.sh`` builds one cache and trains every
method and seed from it.

Missing mass, explicitly. A cached row becomes a full distribution: its k cached log-probabilities, and the rest
mass 1 − Σ_topk p spread uniformly over the V − k other tokens (log((1 − Σp)/(V − k)), floored at 1e-30 of mass).
The reconstructed B×m×V tensor is handed to the loss as the teacher "logits" (log-probs are logits up to a constant,
and every loss normalises them), so kd, uld, minedit and multilevel_ot run unchanged; with k = V it is the teacher's
exact log softmax and the loss equals the live loss. Losses that need the teacher's hidden states (dskd, dskd_cma,
mcw_kd) need ``store=hidden``; those that need the teacher model itself (preference pairs, ``reference=teacher``) are
refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from prefkd.losses.base import ModelOutputs
from prefkd.models.heads import output_head
from prefkd.training.teacher_placement import split_teacher_config
from prefkd.utils.devices import resolve_device

FORMAT = 2  # 2: the split key covers the token ids only (one cache serves every loss on the same data)
MIN_MASS = 1e-30


def _rows(logits: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs (sorted) and indices of every position of every sequence up to its length."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k, dim=-1)
    return top.values[mask], top.indices[mask].to(torch.int32)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a causal LM computes from its last hidden state: ``model``'s output head applied to ``hidden``
    (B×m×d -> B×m×V, in the head's dtype)."""
    head = model.get_output_embeddings()
    return head(hidden.to(head.weight.dtype))


def check_head(model, hidden: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> None:
    """``cache.store=hidden`` rebuilds logits as head(h): refuse a model for which that is not its own logits."""
    rebuilt = head_logits(model, hidden)[mask].float()
    if not torch.allclose(rebuilt, logits[mask].float(), rtol=1e-4, atol=1e-4):
        gap = (rebuilt - logits[mask].float()).abs().max().item()
        raise ValueError(f"cache.store=hidden: this teacher's logits are not its output head applied to its last "
                         f"hidden state (max difference {gap:.3g}; logit scaling or soft-capping?); use "
                         f"cache.store=topk")


@torch.no_grad()
def write_split(dataset, teacher_model, out_dir: Path, split: str, top_k: int, batch_size: int = 8,
                shard_size: int = 1000, progress: bool = True, store: str = "topk") -> dict:
    """Run ``teacher_model`` over ``dataset`` (a DistillDataset with teacher fields) and write the split's shards:
    top-k log-probs (``store="topk"``) or last hidden states (``store="hidden"``). Returns the manifest entry."""

    device = next(teacher_model.parameters()).device
    teacher_model.eval()
    t_pad = dataset.teacher_tokenizer.pad_token_id
    shards, n = [], len(dataset)
    vocab = None
    bar = tqdm(total=n, desc=f"teacher cache ({split}, {store})", unit="ex", disable=not progress)
    for s0 in range(0, n, shard_size):
        tensors, lengths = {}, []
        for b0 in range(s0, min(s0 + shard_size, n), batch_size):
            ids = list(range(b0, min(b0 + batch_size, s0 + shard_size, n)))
            batch = dataset.collate([dataset[i] for i in ids], dataset.student_tokenizer.pad_token_id, t_pad)
            mask = batch["teacher_attention_mask"].bool().to(device)
            out = teacher_model(input_ids=batch["teacher_input_ids"].to(device), attention_mask=mask.long(),
                                output_hidden_states=store == "hidden", use_cache=False)
            vocab = out.logits.shape[-1]
            if store == "hidden":
                if b0 == 0:
                    check_head(teacher_model, out.hidden_states[-1], out.logits, mask)
                rows = {"hidden": out.hidden_states[-1][mask].float()}
            else:
                logp, index = _rows(out.logits, mask, min(top_k, vocab))
                rows = {"logp": logp, "index": index}
            for key, value in rows.items():
                tensors.setdefault(key, []).append(value.cpu())
            lengths.extend(mask.sum(1).tolist())
            bar.update(len(ids))
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        name = f"{split}-{len(shards):05d}.safetensors"
        save_file({**{k: torch.cat(v).contiguous() for k, v in tensors.items()}, "offsets": offsets},
                  str(out_dir / name))
        shards.append(name)
    bar.close()
    return {"key": dataset.token_key, "n": n, "shards": shards, "shard_size": shard_size, "vocab": vocab}


class TeacherCache:
    """Reader of a cache directory: :meth:`outputs` gives the teacher's outputs for dataset examples (B×m×V log-probs
    rebuilt from the top-k, or head(h) and h from the hidden states)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"trainer.teacher_cache={directory}: no manifest.json there; build the cache with "
                                    f"`python -m prefkd.teacher_cache ... cache.dir={directory}`")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest}: cache format {self.manifest.get('format')}, this prefkd reads {FORMAT}; "
                             f"rebuild the cache")
        self.top_k, self.teacher = self.manifest["top_k"], self.manifest["teacher"]
        self.store = self.manifest.get("store", "topk")  # "topk": log-probs; "hidden": last hidden states
        self._shards: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def tokenizer(self):
        from prefkd.models.loading import load_tokenizer

        return load_tokenizer(str(self.dir / "tokenizer"))

    def check(self, split: str, dataset) -> None:
        """The split must have been cached for exactly this data (records, tokenizers, lengths)."""
        entry = self.manifest["splits"].get(split)
        if entry is None:
            raise ValueError(f"teacher cache {self.dir} has no {split!r} split "
                             f"(it has {sorted(self.manifest['splits'])})")
        if entry["key"] != dataset.token_key or entry["n"] != len(dataset):
            raise ValueError(f"teacher cache {self.dir} ({split}) was built for other data, tokenizers or length "
                             f"budgets than this run's; rebuild it with `python -m prefkd.teacher_cache` and the same "
                             f"model=/dataset=/teacher= options as the training command")

    def _shard(self, split: str, number: int) -> dict[str, torch.Tensor]:
        key = (split, number)
        if key not in self._shards:
            if len(self._shards) > 4:  # keep a few shards in memory
                self._shards.pop(next(iter(self._shards)))
            self._shards[key] = load_file(str(self.dir / self.manifest["splits"][split]["shards"][number]))
        return self._shards[key]

    def _example(self, split: str, example: int) -> tuple[dict[str, torch.Tensor], slice]:
        """The shard holding ``example`` and the slice of its rows."""
        entry = self.manifest["splits"][split]
        shard = self._shard(split, example // entry["shard_size"])
        i = example % entry["shard_size"]
        return shard, slice(int(shard["offsets"][i]), int(shard["offsets"][i + 1]))

    def rows(self, split: str, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions × k log-probs, positions × k indices) of one example (``store="topk"``)."""
        shard, rows = self._example(split, example)
        return shard["logp"][rows], shard["index"][rows].long()

    def hidden(self, split: str, examples: list[int], length: int, device) -> torch.Tensor:
        """B×length×d last hidden states of ``examples`` (``store="hidden"``; padding positions: 0), fp32."""
        states = [shard["hidden"][rows] for shard, rows in (self._example(split, e) for e in examples)]
        out = torch.zeros(len(examples), length, states[0].shape[-1], device=device)
        for b, h in enumerate(states):
            out[b, :len(h)] = h.to(device)
        return out

    def outputs(self, split: str, examples: list[int], length: int, device, model=None, *,
                fused: bool = False) -> ModelOutputs:
        """The teacher's outputs for ``examples`` as the loss reads them: from a ``hidden`` cache, logits = head(h)
        with ``model``'s head (B×length×V) and h (B×length×d), or with ``fused`` h and the head
        (:func:`prefkd.models.heads.output_head`) and no logits; from a ``topk`` cache, the log-probs only."""
        if self.store != "hidden":
            return ModelOutputs(self.logits(split, examples, length, device))
        hidden = self.hidden(split, examples, length, device).to(model.get_output_embeddings().weight.dtype)
        if fused:
            return ModelOutputs(None, hidden, model, output_head(model))
        return ModelOutputs(head_logits(model, hidden), hidden, model)

    def logits(self, split: str, examples: list[int], length: int, device, dtype=torch.float32) -> torch.Tensor:
        """B×length×V teacher log-probs of ``examples`` (padding positions: uniform), missing mass explicit."""
        vocab = self.manifest["splits"][split]["vocab"]
        out = torch.zeros(len(examples), length, vocab, dtype=dtype, device=device)
        for b, example in enumerate(examples):
            logp, index = self.rows(split, example)
            logp, index = logp.to(device), index.to(device)
            n, k = logp.shape
            if k < vocab:
                rest = (1.0 - logp.double().exp().sum(-1)).clamp_min(MIN_MASS) / (vocab - k)
                out[b, :n] = rest.log().to(dtype)[:, None]
            out[b, :n].scatter_(1, index, logp.to(dtype))
        return out


def build(cfg) -> Path:
    """Build the cache for the train and dev splits of a composed train config plus ``cache.*`` keys."""
    from hydra.utils import instantiate

    from prefkd.training.datasets import build_datasets, check_kind
    from prefkd.training.schema import check_entry

    check_entry(cfg, "teacher_cache")  # every key, before any data or model loads
    store = cfg.cache.store
    loss = instantiate(cfg.loss)
    check_kind(cfg, loss)
    splits = instantiate(cfg.dataset.source)  # the records are read (and checked) before any model loads
    out = Path(cfg.cache.dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    student, teacher = instantiate(cfg.student), instantiate(split_teacher_config(cfg.teacher)[0])
    loss.setup(student.tokenizer, teacher.tokenizer)
    train, dev = build_datasets(cfg, splits, student, teacher, loss)
    teacher.model.to(resolve_device(cfg.cache.device))
    splits = {}
    for split, ds in (("train", train), ("dev", dev)):
        if ds is not None:
            splits[split] = write_split(ds, teacher.model, out, split, int(cfg.cache.top_k),
                                        int(cfg.cache.batch_size), int(cfg.cache.shard_size), bool(cfg.cache.progress),
                                        store=store)
    teacher.tokenizer.save_pretrained(out / "tokenizer")
    manifest = {"format": FORMAT, "teacher": teacher.name, "store": store,
                "top_k": int(cfg.cache.top_k) if store == "topk" else None, "splits": splits,
                "mb": round(sum((out / s).stat().st_size for e in splits.values() for s in e["shards"]) / 2**20, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the cache complete
    return out
