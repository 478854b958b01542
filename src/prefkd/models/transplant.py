"""Tokenizer transplant: give a pretrained causal LM a new tokenizer (e.g. SmolLM2 on GPT-2's vocabulary).

Every row of the new input embedding (and of the output head when it is not tied to it) is built from the
rows of the source tokens that spell the same text. For each token v of the target vocabulary:

1. **special**: the target's EOS, BOS, UNK and PAD take the row of the source's corresponding special
   token: eos→eos; bos→bos (eos when the source has no bos); unk→unk (or eos); pad→pad (or eos). When one
   target id is several of these (GPT-2's ``<|endoftext|>``), eos wins.
2. **copied**: when text(v), as bytes, is exactly the text of one source token, that row is copied (an
   ordinary token matches ordinary source tokens; a special one may also match a source special token of
   the same text, such as ``<|im_start|>``).
3. **averaged**: otherwise the row is the mean of the source rows of the source tokenization of text(v)::

       row_new(v) = mean_{u ∈ tok_src(text(v))} row_src(u)

4. **fallback**: an empty text (or one the source cannot spell) takes the mean of all source rows.

text(v) is the token's bytes. Byte-level vocabularies (GPT-2, SmolLM2, Qwen: ``Ġ`` is a space, ``Ċ`` a
newline) are mapped back through the byte↔unicode table; SentencePiece vocabularies (LLaMA, TinyLLaMA,
Mistral) turn ``▁`` into a space and the byte-fallback tokens ``<0xNN>`` into the byte 0xNN; added tokens
are their literal content. tok_src tokenizes the text as it appears inside a longer text: no special tokens
(``add_special_tokens=False``) and without the leading space SentencePiece prepends to a whole text (so
``ing`` is the suffix ``ing``, not the word ``▁ing``). Bytes that are not valid UTF-8 on their own (a piece of
a multi-byte character, such as GPT-2's ``æĹ`` = ``\\xe6\\x97``, two thirds of ``日``) map to the source's
tokens for those raw bytes (byte-level: the byte's own token; SentencePiece: ``<0xNN>``), never to a
replacement character; valid text around them is tokenized as text.

All target texts go through the source tokenizer in one batched call and the rows are one
``embedding_bag(mode="mean")``: GPT-2's 50,257 rows take about a second.

- :func:`transplant_embeddings` transplants a model in place (config and generation config get the
  target's vocabulary size and special ids; tied weights stay tied) and returns :class:`TransplantStats`.
- :func:`transplanted_dir` builds a ``save_pretrained`` directory (model + the new tokenizer) once, cached
  under ``cache_root()/transplant`` (or written to ``out``); :func:`load_transplanted` is the model factory
  for ``_target_`` in a student config.
- ``python -m prefkd.models.transplant model.path=SRC tokenizer=TOK [out=DIR]`` (config/transplant.yaml).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from prefkd.models.bundle import ModelBundle
from prefkd.models.loading import DTYPES, ModelLoadError, load_pretrained, load_tokenizer, resolve_path
from prefkd.utils.cache import cache_root

log = logging.getLogger(__name__)

VERSION = "1"  # part of the cache key: bump when the rule changes
MANIFEST = "transplant.json"  # written last into every built directory: what was built from what, and the stats
GPT2_TOKENIZER = "package:prefkd/assets/tokenizers/gpt2"  # shipped with prefkd (no network needed)

_BYTE_TO_CHAR = bytes_to_unicode()  # GPT-2's byte-level table: byte value -> printable character
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_RAW_BYTES = re.compile(r"([\udc80-\udcff]+)")  # surrogateescape's stand-ins for bytes that are not UTF-8
_TOKENIZER_FILES = re.compile(r"tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
                              r".*\.model|chat_template.*|config\.json")


# ---------------------------------------------------------------------------------------------------------
# What each token id spells


@dataclass
class Vocab:
    """What the transplant needs to know about one tokenizer."""

    texts: list[bytes]  # the bytes each id stands for (b"" for an id without a token)
    special: set[int]  # ids of special tokens
    byte_ids: dict[int, int]  # byte value -> id of the token that is exactly that byte
    byte_level: bool  # GPT-2-style byte-level BPE (else SentencePiece-style ▁ and <0xNN>)


def _components(node: dict | None) -> Iterator[dict]:
    """A normalizer / pre-tokenizer / decoder of a tokenizer.json and, recursively, the parts of a Sequence."""
    if isinstance(node, dict):
        yield node
        for key in ("normalizers", "pretokenizers", "decoders"):
            for child in node.get(key) or []:
                yield from _components(child)


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for byte-level BPE (GPT-2, SmolLM2, Qwen), False for SentencePiece-style vocabularies."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: GPT2Tokenizer keeps the table
        return hasattr(tokenizer, "byte_decoder")
    spec = json.loads(backend.to_str())
    return any(c.get("type") == "ByteLevel"
               for part in ("pre_tokenizer", "decoder") for c in _components(spec.get(part)))


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes of one vocabulary entry: ``Ġthe`` -> b" the" (byte-level); ``▁the`` -> b" the", ``<0x0A>`` ->
    b"\\n"."""
    if byte_level:
        if all(c in _CHAR_TO_BYTE for c in piece):
            return bytes(_CHAR_TO_BYTE[c] for c in piece)
        return piece.encode()
    match = _BYTE_FALLBACK.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode()


def describe(tokenizer: PreTrainedTokenizerBase) -> Vocab:
    """Bytes, special ids and single-byte tokens of every id of ``tokenizer``."""
    byte_level = is_byte_level(tokenizer)
    added = tokenizer.added_tokens_decoder
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    texts = [added[i].content.encode() if i in added else piece_bytes(p, byte_level) if p else b""
             for i, p in enumerate(pieces)]
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    vocab = tokenizer.get_vocab()
    names = {b: _BYTE_TO_CHAR[b] if byte_level else f"<0x{b:02X}>" for b in range(256)}
    byte_ids = {b: vocab[name] for b, name in names.items() if name in vocab}
    return Vocab(texts, special, byte_ids, byte_level)


def special_pairs(source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> dict[int, int]:
    """target id -> source id for the target's eos, bos, unk, pad (missing source bos/unk/pad: its eos)."""
    pairs: dict[int, int] = {}
    for name in ("eos", "bos", "unk", "pad"):  # eos first: it wins when the target reuses one id
        target_id = getattr(target, f"{name}_token_id")
        source_id = getattr(source, f"{name}_token_id")
        source_id = source.eos_token_id if source_id is None else source_id
        if target_id is not None and target_id not in pairs and source_id is not None:
            pairs[target_id] = source_id
    return pairs


def _exact_matches(src: Vocab) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """bytes -> source id, for ordinary tokens and for special tokens. Among equal texts the lowest id wins,
    and an ordinary piece wins over a SentencePiece byte token (``▁`` over ``<0x20>``)."""
    ordinary: dict[bytes, int] = {}
    special: dict[bytes, int] = {}
    fallback_bytes = set() if src.byte_level else set(src.byte_ids.values())
    for i, text in enumerate(src.texts):
        if text and i not in fallback_bytes:
            (special if i in src.special else ordinary).setdefault(text, i)
    for i in sorted(fallback_bytes):
        ordinary.setdefault(src.texts[i], i)
    return ordinary, special


# ---------------------------------------------------------------------------------------------------------
# The plan: which source rows make each target row


def _drop_prepend(normalizer: dict | None) -> dict | None:
    """The normalizer without SentencePiece's ``Prepend("▁")`` (the space it adds before a whole text)."""
    if not normalizer or (normalizer.get("type") == "Prepend" and normalizer.get("prepend") == "▁"):
        return None
    if normalizer.get("type") == "Sequence":
        normalizer["normalizers"] = [n for n in normalizer["normalizers"]
                                     if not (n.get("type") == "Prepend" and n.get("prepend") == "▁")]
    return normalizer


def _without_prefix_space(backend: Tokenizer) -> Tokenizer:
    """A copy of a fast tokenizer's backend that tokenizes a text as it appears inside a longer text:
    no added leading space (Metaspace ``prepend_scheme``, ByteLevel ``add_prefix_space``, ``Prepend("▁")``),
    no truncation, no padding."""
    spec = json.loads(backend.to_str())
    spec["normalizer"] = _drop_prepend(spec.get("normalizer"))
    for node in _components(spec.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            if "add_prefix_space" in node:  # tokenizers < 0.14
                node["add_prefix_space"] = False
        elif node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
    spec["truncation"] = spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec))


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Source ids of each text, in one batched call (see :func:`_without_prefix_space`)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: its own call (a SentencePiece one may add a leading space)
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [enc.ids for enc in _without_prefix_space(backend).encode_batch(list(texts), add_special_tokens=False)]


@dataclass
class RowPlan:
    """For every target id, the source ids whose rows are averaged (empty: the mean of all source rows)."""

    sources: list[list[int]]
    kinds: list[str]  # "special" | "copied" | "averaged" | "fallback"
    partial_utf8: int  # rows whose text holds bytes that are not UTF-8 on their own
    source_size: int  # len(source tokenizer): the rows averaged by "fallback"


def plan_rows(source_tokenizer: PreTrainedTokenizerBase, target_tokenizer: PreTrainedTokenizerBase) -> RowPlan:
    """Apply the module's rule to every target id (pure; no model needed)."""
    src, tgt = describe(source_tokenizer), describe(target_tokenizer)
    n = len(tgt.texts)
    sources: list[list[int]] = [[] for _ in range(n)]
    kinds = ["fallback"] * n
    for target_id, source_id in special_pairs(source_tokenizer, target_tokenizer).items():
        sources[target_id], kinds[target_id] = [source_id], "special"
    ordinary, special = _exact_matches(src)

    texts: list[str] = []  # every text segment of every remaining token: one batched tokenizer call
    parts: dict[int, list[int | list[int]]] = {}  # target id -> [index into texts | source ids of raw bytes]
    partial = 0
    for v, text in enumerate(tgt.texts):
        if kinds[v] == "special" or not text:
            continue
        hit = next((table[text] for table in ((special, ordinary) if v in tgt.special else (ordinary,))
                    if text in table), None)
        if hit is not None:
            sources[v], kinds[v] = [hit], "copied"
            continue
        segments = _RAW_BYTES.split(text.decode("utf-8", "surrogateescape"))  # text, raw, text, raw, ...
        partial += len(segments) > 1
        parts[v] = []
        for k, segment in enumerate(segments):
            if k % 2 == 0 and segment:
                parts[v].append(len(texts))
                texts.append(segment)
            elif k % 2 == 1:
                raw = segment.encode("utf-8", "surrogateescape")
                parts[v].append([src.byte_ids[b] for b in raw if b in src.byte_ids])
    encoded = encode_texts(source_tokenizer, texts)
    for v, pieces in parts.items():
        sources[v] = [i for p in pieces for i in (encoded[p] if isinstance(p, int) else p)]
        kinds[v] = "averaged" if sources[v] else "fallback"
    return RowPlan(sources, kinds, partial, len(src.texts))


def transplant_rows(weight: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """The new [len(target), ...] rows for a source [n_source, ...] matrix (or bias vector) (pure)."""
    matrix = weight.detach().float().reshape(weight.shape[0], -1)
    flat = torch.tensor([i for ids in plan.sources for i in ids], dtype=torch.long)
    if len(flat) and int(flat.max()) >= matrix.shape[0]:
        raise ValueError(f"source id {int(flat.max())} is outside the source's {matrix.shape[0]} rows: "
                         f"the source tokenizer does not belong to this model.")
    lengths = torch.tensor([len(ids) for ids in plan.sources], dtype=torch.long)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
    rows = F.embedding_bag(flat, matrix, offsets, mode="mean")
    empty = lengths == 0
    if empty.any():
        rows[empty] = matrix[:plan.source_size].mean(0)
    return rows.reshape(len(plan.sources), *weight.shape[1:]).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------
# A model


@dataclass
class TransplantStats:
    """How the target rows were made (see the module docstring)."""

    source_vocab: int
    target_vocab: int
    copied: int
    averaged: int
    special: int
    fallback: int
    partial_utf8: int  # rows not copied whose text holds bytes that are not UTF-8 on their own (raw byte tokens)
    mean_pieces: float  # source tokens per averaged row
    tied: bool
    seconds: float

    def __str__(self) -> str:
        return (f"{self.target_vocab} rows from {self.source_vocab}: {self.copied} copied, {self.averaged} averaged "
                f"({self.mean_pieces:.2f} source tokens each), {self.special} special, {self.fallback} fallback "
                f"(mean of all rows); {self.partial_utf8} partial UTF-8; "
                f"{'tied' if self.tied else 'untied'} head; {self.seconds:.1f} s")


def _set_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)
    if hasattr(model.config, "unk_token_id"):
        model.config.unk_token_id = tokenizer.unk_token_id
    embedding = model.get_input_embeddings()
    if getattr(embedding, "padding_idx", None) is not None:  # as a reload from the saved config would set it
        embedding.padding_idx = tokenizer.pad_token_id


def transplant_embeddings(model: PreTrainedModel, source_tokenizer: PreTrainedTokenizerBase,
                          target_tokenizer: PreTrainedTokenizerBase) -> TransplantStats:
    """Move ``model`` (in place) from ``source_tokenizer``'s vocabulary to ``target_tokenizer``'s.

    The input embedding, and the output head (weight and bias) when it is not tied to it, get one row per
    target token by the module's rule; config.vocab_size and the bos/eos/pad ids of the config and the
    generation config become the target's. A tied head stays tied.
    """
    start = time.perf_counter()
    plan = plan_rows(source_tokenizer, target_tokenizer)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is embedding.weight
    new_embedding = transplant_rows(embedding.weight, plan)
    new_head = None if tied else transplant_rows(head.weight, plan)
    new_bias = None if head is None or getattr(head, "bias", None) is None else transplant_rows(head.bias, plan)

    model.resize_token_embeddings(len(plan.sources), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_embedding)
        if new_head is not None:
            model.get_output_embeddings().weight.copy_(new_head)
        if new_bias is not None:
            model.get_output_embeddings().bias.copy_(new_bias)
    model.config.vocab_size = len(plan.sources)
    _set_special_ids(model, target_tokenizer)

    averaged = [len(ids) for ids, kind in zip(plan.sources, plan.kinds) if kind == "averaged"]
    stats = TransplantStats(
        source_vocab=len(source_tokenizer), target_vocab=len(plan.sources), copied=plan.kinds.count("copied"),
        averaged=len(averaged), special=plan.kinds.count("special"), fallback=plan.kinds.count("fallback"),
        partial_utf8=plan.partial_utf8, mean_pieces=sum(averaged) / max(1, len(averaged)), tied=tied,
        seconds=time.perf_counter() - start)
    log.info("embedding rows: %s", stats)
    return stats


# ---------------------------------------------------------------------------------------------------------
# A cached directory, and the model factory


def _looks_local(path: str) -> bool:
    """A path the user meant as a local file or directory (a hub id is ``name`` or ``org/name``)."""
    return not path.startswith("package:") and (path.startswith(("/", ".", "~")) or path.count("/") > 1)


def check_request(path: str, tokenizer: str, num_layers: int | None = None, keep_layers: Sequence[int] | None = None,
                  dtype: str = "float32", *, prefix: str = "") -> None:
    """Fail before anything loads: ``prefix`` names the model keys as the user wrote them (``model.`` in the CLI)."""
    if not path:
        raise ValueError(f"{prefix}path is not set: pass the source model ({prefix}path=DIR, hub id or .gguf).")
    if not tokenizer:
        raise ValueError(f"tokenizer is not set: pass the new tokenizer (tokenizer=DIR or hub id, e.g. "
                         f"tokenizer={GPT2_TOKENIZER}).")
    if num_layers is not None and keep_layers is not None:
        raise ValueError(f"{prefix}num_layers={num_layers} and {prefix}keep_layers={list(keep_layers)}: give one of "
                         f"them, not both (set the other to null).")
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"{prefix}num_layers={num_layers} must be at least 1 (null keeps all layers).")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
    checks = ((f"{prefix}path", path, "the source model"), ("tokenizer", tokenizer, "the new tokenizer"))
    for key, value, what in checks:
        try:
            resolve_path(value)
        except ModelLoadError as err:
            raise ModelLoadError(f"{key}: {err}") from err
        if _looks_local(value) and not Path(value).expanduser().exists():
            example = f"tokenizer={GPT2_TOKENIZER}" if key == "tokenizer" else f"{key}=/models/smollm2"
            raise ModelLoadError(f"{key}={value!r}: no such file or directory. Pass {what} as an existing local "
                                 f"directory or a hub id (e.g. {example}).")


def _file_stats(path: Path) -> list:
    """[name, size, mtime] of a file, or of every file under a directory (a local source's identity)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [[str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, int(f.stat().st_mtime)]
            for f in files]


def _source_identity(path: str) -> dict:
    directory, gguf_file = resolve_path(path)
    local = Path(directory) / gguf_file if gguf_file else Path(directory)
    if local.exists():
        return {"local": str(local.resolve()), "files": _file_stats(local)}
    return {"hub": path}


def _tokenizer_identity(tokenizer: str) -> dict:
    directory, gguf_file = resolve_path(tokenizer)
    folder = Path(directory)
    if gguf_file or not folder.is_dir():
        return _source_identity(tokenizer)
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.iterdir() if f.is_file() and _TOKENIZER_FILES.fullmatch(f.name)):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return {"files": digest.hexdigest()}


def fingerprint(path: str, tokenizer: str, num_layers: int | None = None, keep_layers: Sequence[int] | None = None,
                dtype: str = "float32") -> str:
    """The cache key: the source's identity (local: resolved path, sizes, mtimes; hub: the id), the tokenizer
    files' contents (hub: the id), the layers kept, the dtype and :data:`VERSION`."""
    key = {"version": VERSION, "source": _source_identity(path), "tokenizer": _tokenizer_identity(tokenizer),
           "num_layers": num_layers, "keep_layers": None if keep_layers is None else list(keep_layers),
           "dtype": str(DTYPES[dtype]).removeprefix("torch.")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _slug(path: str) -> str:
    name = Path(path.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.removesuffix(".gguf"))[:40]


def read_manifest(directory: str | Path) -> dict | None:
    """The ``transplant.json`` of a built directory (None when it is not one)."""
    file = Path(directory) / MANIFEST
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _built(directory: Path, key: str) -> bool:
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("fingerprint") == key


def _load_target_tokenizer(tokenizer: str) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(tokenizer)
    except ModelLoadError as err:
        raise ModelLoadError(f"tokenizer={tokenizer!r}: {err}. Pass a directory holding tokenizer files or a hub "
                             f"id (e.g. tokenizer={GPT2_TOKENIZER}).") from err


def _write_atomically(dest: Path, bundle: ModelBundle, manifest: dict) -> None:
    """save_pretrained into a temporary sibling, then rename: a killed build leaves no half-written ``dest``."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        bundle.model.save_pretrained(tmp)
        bundle.tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # an empty out=DIR made beforehand
        os.replace(tmp, dest)
    except OSError:
        if not _built(dest, manifest["fingerprint"]):  # else: another process finished the same build first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def transplanted_dir(path: str, tokenizer: str, num_layers: int | None = None,
                     keep_layers: Sequence[int] | None = None, *, out: str | None = None, dtype: str = "float32",
                     prefix: str = "") -> str:
    """A ``save_pretrained`` directory with ``path``'s model (depth-pruned like :func:`load_pretrained`) on
    ``tokenizer``'s vocabulary, and that tokenizer. Built once: under ``cache_root()/transplant/`` keyed by
    :func:`fingerprint`, or in ``out``; a later call with the same inputs returns it without loading anything.
    ``prefix`` names the model keys in error messages (``model.`` for the CLI)."""
    return str(build(path, tokenizer, num_layers, keep_layers, out=out, dtype=dtype, prefix=prefix)[0])


def build(path: str, tokenizer: str, num_layers: int | None = None, keep_layers: Sequence[int] | None = None, *,
          out: str | None = None, dtype: str = "float32", prefix: str = "") -> tuple[Path, bool]:
    """:func:`transplanted_dir`, also saying whether the directory was there already."""
    check_request(path, tokenizer, num_layers, keep_layers, dtype, prefix=prefix)
    key = fingerprint(path, tokenizer, num_layers, keep_layers, dtype)
    dest = (Path(out).expanduser() if out else
            cache_root() / "transplant" / f"{_slug(path)}-{_slug(tokenizer)}-{key}")
    if _built(dest, key):
        return dest, True
    if out and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"out={out!r} exists and is not this transplant's output: remove it or choose "
                              f"another out.")
    target = _load_target_tokenizer(tokenizer)  # before the model: a bad tokenizer fails in a second
    source = load_pretrained(path, num_layers=num_layers, keep_layers=keep_layers)
    stats = transplant_embeddings(source.model, source.tokenizer, target)
    source.model.to(DTYPES[dtype])
    manifest = {"fingerprint": key, "version": VERSION, "source": source.name, "path": path, "tokenizer": tokenizer,
                "num_layers": num_layers, "keep_layers": None if keep_layers is None else list(keep_layers),
                "dtype": dtype, "stats": asdict(stats)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(dest, ModelBundle(source.model, target, source.name), manifest)
    log.info("transplanted %s to tokenizer %s: %s", source.name, tokenizer, dest)
    return dest, False


def load_transplanted(path: str, *, tokenizer: str, num_layers: int | None = None,
                      keep_layers: Sequence[int] | None = None, dtype: str = "float32", lora: dict | None = None,
                      gradient_checkpointing: bool = False, freeze: bool = False,
                      attn_implementation: str | None = None) -> ModelBundle:
    """Model factory (a ``_target_`` for config/student): ``path``'s model on ``tokenizer``'s vocabulary.

    Builds the cached directory of :func:`transplanted_dir` on first use, then loads it with
    :func:`load_pretrained` (dtype, lora, gradient_checkpointing, freeze, attn_implementation as there).
    """
    directory = transplanted_dir(path, tokenizer, num_layers, keep_layers)
    bundle = load_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation, lora=lora,
                             gradient_checkpointing=gradient_checkpointing, freeze=freeze)
    source = (read_manifest(directory) or {}).get("source", path)
    bundle.name = f"transplant({source} -> tokenizer {tokenizer})"
    return bundle


# ---------------------------------------------------------------------------------------------------------
# python -m prefkd.models.transplant


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from prefkd.utils.config import config_dir

    @hydra.main(config_path=config_dir(), config_name="transplant", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        model = cfg.model
        keep = OmegaConf.to_container(model.keep_layers) if model.keep_layers is not None else None
        directory, reused = build(model.path, cfg.tokenizer, model.num_layers, keep, out=cfg.out, dtype=cfg.dtype,
                                  prefix="model.")
        manifest = read_manifest(directory)
        print(f"transplant: {directory}{' (already built)' if reused else ''}")
        print(f"source: {manifest['source']}; tokenizer: {manifest['tokenizer']}")
        print(f"rows: {TransplantStats(**manifest['stats'])}")

    _main()


if __name__ == "__main__":
    main()
