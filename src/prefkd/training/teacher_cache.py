"""Offline teacher cache: run the teacher once, store its top-k log-probabilities, train without it.

    python -m prefkd.teacher_cache model=... [teacher=...] [dataset=...] cache.dir=DIR cache.top_k=K
    python -m prefkd.train model=... loss=kd trainer.teacher_cache=DIR        # no teacher model loaded

Format of DIR: ``manifest.json`` (format, teacher name, top_k, vocabulary size, per split the dataset
fingerprint = :attr:`prefkd.data.dataset.DistillDataset.key`, the number of examples and the shard files),
``tokenizer/`` (the teacher tokenizer, which the data pipeline still needs), and per split shards
``<split>-NNNNN.safetensors`` holding, for ``shard_size`` examples in dataset order, ``logp`` (positions × k, fp32,
the teacher's log-probabilities log softmax(z^t) of its top-k tokens, sorted), ``index`` (positions × k, int32) and
``offsets`` (n + 1, int64: example i owns rows offsets[i]:offsets[i+1], one per teacher input position).

Missing mass, explicitly. A cached row becomes a full distribution: its k cached log-probabilities, and the rest
mass 1 − Σ_topk p spread uniformly over the V − k other tokens (log((1 − Σp)/(V − k)), floored at 1e-30 of mass).
The reconstructed B×m×V tensor is handed to the loss as the teacher "logits" (log-probs are logits up to a constant,
and every loss normalises them), so kd, uld, minedit and multilevel_ot run unchanged; with k = V it is the teacher's
exact log softmax and the loss equals the live loss. Losses that need the teacher's hidden states or the teacher
model itself (dskd, dskd_cma, mcw_kd, tisdpo_kdalign) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from prefkd.utils.devices import resolve_device

FORMAT = 1
MIN_MASS = 1e-30


def _rows(logits: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs (sorted) and indices of every position of every sequence up to its length."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k, dim=-1)
    return top.values[mask], top.indices[mask].to(torch.int32)


@torch.no_grad()
def write_split(dataset, teacher_model, out_dir: Path, split: str, top_k: int, batch_size: int = 8,
                shard_size: int = 1000, progress: bool = True) -> dict:
    """Run ``teacher_model`` over ``dataset`` (a DistillDataset with teacher fields) and write the split's shards.
    Returns the split's manifest entry."""
    from prefkd.data.dataset import collate

    device = next(teacher_model.parameters()).device
    teacher_model.eval()
    t_pad = dataset.teacher_tokenizer.pad_token_id
    shards, n = [], len(dataset)
    vocab = None
    bar = tqdm(total=n, desc=f"teacher cache ({split})", unit="ex", disable=not progress)
    for s0 in range(0, n, shard_size):
        values, indices, lengths = [], [], []
        for b0 in range(s0, min(s0 + shard_size, n), batch_size):
            ids = list(range(b0, min(b0 + batch_size, s0 + shard_size, n)))
            batch = collate([dataset[i] for i in ids], dataset.student_tokenizer.pad_token_id, t_pad)
            mask = batch["teacher_attention_mask"].bool()
            logits = teacher_model(input_ids=batch["teacher_input_ids"].to(device),
                                   attention_mask=mask.long().to(device)).logits
            vocab = logits.shape[-1]
            k = min(top_k, vocab)
            v, i = _rows(logits, mask.to(device), k)
            values.append(v.cpu())
            indices.append(i.cpu())
            lengths.extend(mask.sum(1).tolist())
            bar.update(len(ids))
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        name = f"{split}-{len(shards):05d}.safetensors"
        save_file({"logp": torch.cat(values).contiguous(), "index": torch.cat(indices).contiguous(),
                   "offsets": offsets}, str(out_dir / name))
        shards.append(name)
    bar.close()
    return {"key": dataset.key, "n": n, "shards": shards, "shard_size": shard_size, "vocab": vocab}


class TeacherCache:
    """Reader of a cache directory: :meth:`logits` rebuilds B×m×V teacher log-probs for dataset examples."""

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
        if entry["key"] != dataset.key or entry["n"] != len(dataset):
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

    def rows(self, split: str, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions × k log-probs, positions × k indices) of one example."""
        entry = self.manifest["splits"][split]
        shard = self._shard(split, example // entry["shard_size"])
        i = example % entry["shard_size"]
        lo, hi = int(shard["offsets"][i]), int(shard["offsets"][i + 1])
        return shard["logp"][lo:hi], shard["index"][lo:hi].long()

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

    from prefkd.training.datasets import build_datasets

    out = Path(cfg.cache.dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    loss = instantiate(cfg.loss)
    student, teacher = instantiate(cfg.student), instantiate(cfg.teacher)
    loss.setup(student.tokenizer, teacher.tokenizer)
    train, dev = build_datasets(cfg, instantiate(cfg.dataset.source), student, teacher, loss)
    teacher.model.to(resolve_device(cfg.cache.device))
    splits = {}
    for split, ds in (("train", train), ("dev", dev)):
        if ds is not None:
            splits[split] = write_split(ds, teacher.model, out, split, int(cfg.cache.top_k),
                                        int(cfg.cache.batch_size), int(cfg.cache.shard_size), bool(cfg.cache.progress))
    teacher.tokenizer.save_pretrained(out / "tokenizer")
    manifest = {"format": FORMAT, "teacher": teacher.name, "top_k": int(cfg.cache.top_k), "splits": splits,
                "mb": round(sum((out / s).stat().st_size for e in splits.values() for s in e["shards"]) / 2**20, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the cache complete
    return out
