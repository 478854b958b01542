"""Tiny tokenizers and tiny random models, so prefkd can test cross-tokenizer KD without any download.

- :func:`tiny_tokenizer` trains one of two small BPE tokenizers on the embedded instruction data
  (:mod:`prefkd.data.embedded`): ``"a"`` is GPT-2-style byte-level BPE (``Ġ`` marks a word start), ``"b"``
  is SentencePiece/LLaMA-style BPE (``▁`` marks a word start, digits split, byte fallback). Their
  vocabularies and segmentations differ, which is what cross-tokenizer methods need. Training takes well
  under a second; the result is cached on disk.
- :func:`build_tiny` builds a randomly initialised LLaMA or GPT-2 causal LM for one of them.
- :func:`shrunk_config` / :func:`build_shrunk` keep a real model's tokenizer, vocabulary and special ids
  but shrink everything else, for tests on the real tokenizer pairs (Qwen1.5 → GPT-2, Mistral → TinyLLaMA).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from prefkd.data.embedded import all_text
from prefkd.models.bundle import ModelBundle
from prefkd.models.loading import finish_model, load_tokenizer
from prefkd.utils.cache import cache_root
from prefkd.utils.io import atomic_write

VERSION = "1"  # bump when the training procedure changes (changes of the data change the cache key anyway)
DEFAULT_VOCAB = {"a": 1024, "b": 768}
TRAINING_SEED, TRAINING_RECORDS = 0, 2000
MAX_POSITIONS = 1024
SPECIALS = {  # kind -> (special tokens in id order, eos, bos, unk)
    "a": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None),
    "b": (["<unk>", "<s>", "</s>"], "</s>", "<s>", "<unk>"),
}
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _check_kind(kind: str) -> None:
    if kind not in SPECIALS:
        raise ValueError(f"tokenizer kind={kind!r}: valid kinds are {sorted(SPECIALS)} "
                         f"(a: byte-level BPE with Ġ, b: SentencePiece-style BPE with ▁).")


def _train_a(texts: list[str], vocab_size: int) -> Tokenizer:
    """GPT-2-style byte-level BPE: every byte is in the vocabulary; offsets include the leading space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS["a"][0], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_b(texts: list[str], vocab_size: int) -> Tokenizer:
    """LLaMA-style BPE: ``▁`` for spaces (prepended to the text), digits one by one, newlines alone,
    and the 256 ``<0xNN>`` byte tokens at ids 3..258 for characters outside the learnt alphabet."""
    specials = SPECIALS["b"][0]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Insert the byte tokens after the specials, as in LLaMA's vocabulary (they are ordinary tokens).
    spec = json.loads(tok.to_str())
    n_special = len(specials)
    vocab = {t: (i if i < n_special else i + len(BYTE_TOKENS)) for t, i in spec["model"]["vocab"].items()}
    vocab.update({t: n_special + i for i, t in enumerate(BYTE_TOKENS)})
    spec["model"]["vocab"] = vocab
    return Tokenizer.from_str(json.dumps(spec))


def _wrap(tok: Tokenizer, kind: str) -> PreTrainedTokenizerFast:
    _, eos, bos, unk = SPECIALS[kind]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, unk_token=unk,
                                   pad_token=eos, model_max_length=MAX_POSITIONS,
                                   clean_up_tokenization_spaces=False)


def tiny_tokenizer(kind: str = "a", vocab_size: int | None = None,
                   cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on the embedded data (deterministic), cached on disk.

    kind "a": byte-level BPE, eos = pad = ``<|endoftext|>`` (default vocab 1024); kind "b": SentencePiece-style
    BPE with byte fallback, eos = pad = ``</s>``, bos ``<s>``, unk ``<unk>`` (default vocab 768). Neither adds a
    BOS or EOS when encoding. The cache lives in ``cache_dir`` or ``$PREFKD_CACHE/tokenizers`` (default
    ``~/.cache/prefkd``), in a folder keyed by kind, vocab size, :data:`VERSION` and a hash of the training text.
    """
    _check_kind(kind)
    vocab_size = vocab_size or DEFAULT_VOCAB[kind]
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small (the byte alphabet alone needs 256 + specials).")
    texts = list(all_text(TRAINING_SEED, TRAINING_RECORDS))
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:10]
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    file = folder / f"tiny-{kind}-{vocab_size}-v{VERSION}-{digest}" / "tokenizer.json"
    if file.exists():
        return _wrap(Tokenizer.from_file(str(file)), kind)
    tok = (_train_a if kind == "a" else _train_b)(texts, vocab_size)
    atomic_write(file, tok.to_str())  # concurrent processes write the same content
    return _wrap(tok, kind)


def _init_model(model_cls, config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """Build ``model_cls(config)`` with weights drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def build_tiny(tokenizer: str = "a", arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, intermediate_size: int | None = None, seed: int = 0,
               vocab_size: int | None = None, cache_dir: str | Path | None = None, *, freeze: bool = False,
               lora: dict | None = None, gradient_checkpointing: bool = False) -> ModelBundle:
    """A random causal LM (``arch`` "llama" or "gpt2") on the tiny tokenizer ``tokenizer`` ("a" or "b").

    The embedding has one row per tokenizer token; eos/pad (and bos) ids are set in the config; dropout is
    0; 1024 positions; intermediate size 4 × hidden by default. Same seed, same weights. freeze / lora /
    gradient_checkpointing as in :func:`prefkd.models.loading.load_pretrained`.
    """
    tok = tiny_tokenizer(tokenizer, vocab_size, cache_dir)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    inner = intermediate_size or 4 * hidden_size
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=inner, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, num_key_value_heads=num_heads,
                             max_position_embeddings=MAX_POSITIONS, attention_dropout=0.0,
                             tie_word_embeddings=False, **ids)
        model = _init_model(LlamaForCausalLM, config, seed)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_inner=inner, n_layer=num_layers, n_head=num_heads,
                            n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model = _init_model(GPT2LMHeadModel, config, seed)
    else:
        raise ValueError(f"arch={arch!r}: valid values are ['gpt2', 'llama'].")
    # Set after init: a pad id in LLaMA's config makes that embedding row a zero, frozen padding_idx, and
    # pad = eos here (eos is a real input token).
    model.config.pad_token_id = tok.pad_token_id
    bundle = ModelBundle(model, tok, f"tiny-{arch}(bpe-{tokenizer}, seed={seed})")
    return finish_model(bundle, lora=lora, gradient_checkpointing=gradient_checkpointing, freeze=freeze)


_DROPOUTS = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
             "summary_first_dropout")


def shrunk_config(config_json: str | Path, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                  intermediate_size: int | None = None) -> PretrainedConfig:
    """A real model's config (a ``config.json`` or its folder) with its model type, vocabulary and special
    ids kept and everything else shrunk; dropout 0. LLaMA-style configs keep their GQA ratio where it fits
    (``num_key_value_heads`` divides ``num_heads``); GPT-2 configs shrink n_embd / n_layer / n_head."""
    path = Path(config_json)
    config = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    d = config.to_dict()
    inner = intermediate_size or 4 * hidden_size
    if "n_embd" in d:  # GPT-2 family
        d.update(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=inner)
    else:
        heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
        new_kv = max(1, num_heads * kv // heads)
        while num_heads % new_kv:
            new_kv -= 1
        d.update(hidden_size=hidden_size, intermediate_size=inner, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, num_key_value_heads=new_kv)
        if "head_dim" in d:
            d["head_dim"] = hidden_size // num_heads
        d.pop("layer_types", None)  # recomputed for the new depth (Qwen2's sliding-window layers)
        if "max_window_layers" in d:
            d["max_window_layers"] = min(d["max_window_layers"], num_layers)
    d.update({k: 0.0 for k in _DROPOUTS if k in d})
    return type(config).from_dict(d)


def build_shrunk(tokenizer_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int | None = None, seed: int = 0, *, freeze: bool = False,
                 lora: dict | None = None, gradient_checkpointing: bool = False) -> ModelBundle:
    """A random shrunk model (see :func:`shrunk_config`) with the real tokenizer of ``tokenizer_dir`` (a
    folder holding ``config.json`` and the tokenizer files, loaded offline); pad := eos where missing."""
    tok = load_tokenizer(str(tokenizer_dir))
    config = shrunk_config(Path(tokenizer_dir) / "config.json", hidden_size, num_layers, num_heads,
                           intermediate_size)
    model = _init_model(lambda cfg: AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), config, seed)
    if getattr(model.config, "pad_token_id", None) is None:  # after init, as load_pretrained does
        model.config.pad_token_id = tok.pad_token_id
    bundle = ModelBundle(model, tok, f"shrunk-{config.model_type}({tokenizer_dir}, seed={seed})")
    return finish_model(bundle, lora=lora, gradient_checkpointing=gradient_checkpointing, freeze=freeze)
