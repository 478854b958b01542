"""Word-start markers of tokenizers, derived from the tokenizer itself (never from its class name).

Most tokenizers write the space that starts a word into the token string as a marker character:
byte-level BPE (GPT-2, Qwen) as ``Ġ``, SentencePiece (LLaMA, Mistral) as ``▁``; a few keep the raw
space ``" "``; WordPiece-style tokenizers drop it (marker ``""``). :func:`word_start_marker` finds it by
tokenising ``"a hello"`` and reading what stands in front of ``hello`` in the token strings, and checks
it against the vocabulary (the marker must start a noticeable share of the token strings); when the
probe is inconclusive it falls back to vocabulary counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

PROBE_WORDS = ("hello", "world", "the", "house")
_KNOWN = ("Ġ", "▁", " ")  # only used by the vocabulary-count fallback
_MIN_SHARE = 0.01  # a marker starts at least this share of the vocabulary's token strings


def vocab_strings(tokenizer) -> list[str | None]:
    """The token string of every id ``0 .. max id`` of ``tokenizer.get_vocab()`` (added tokens included);
    ``None`` for ids the vocabulary does not hold."""
    vocab = tokenizer.get_vocab()
    table: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, idx in vocab.items():
        if table[idx] is None or token < table[idx]:  # duplicate ids: keep one string, deterministically
            table[idx] = token
    return table


def token_strings(tokenizer, ids: Iterable[int]) -> list[str]:
    """Token strings of ``ids`` (``convert_ids_to_tokens``; unknown ids give ``""``)."""
    return [t if t is not None else "" for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def strip_marker(token: str, marker: str) -> str:
    """``token`` without its word-start marker(s): every occurrence is removed (``"ĠĠĠ"`` → ``""``), as in
    FuseLLM's and DSKD's MinED code. ``marker == ""`` leaves the token unchanged."""
    return token.replace(marker, "") if marker else token


def _probe(tokenizer, word: str) -> str | None:
    """What stands in front of ``word`` in the token strings of ``"a " + word`` (after those of ``"a"``)."""
    try:
        head = tokenizer.tokenize("a")
        toks = tokenizer.tokenize("a " + word)
    except Exception:  # a tokenizer without a usable ``tokenize``: fall back to the vocabulary
        return None
    if toks[:len(head)] != head:
        return None
    rest = "".join(toks[len(head):])
    cut = rest.find(word)
    return rest[:cut] if cut >= 0 else None


def _share(vocab: Sequence[str | None], marker: str) -> float:
    strings = [t for t in vocab if t]
    return sum(t.startswith(marker) for t in strings) / max(len(strings), 1)


def word_start_marker(tokenizer) -> str:
    """The string a tokenizer writes for the space before a word: ``"Ġ"``, ``"▁"``, ``" "`` or ``""`` (none).

    1. Probe: tokenise ``"a <word>"`` for a few words and take the majority of what precedes the word.
    2. Check: a non-empty marker must start ≥ 1% of the vocabulary's token strings.
    3. Fallback (probe inconclusive or rejected): the most frequent first character of the vocabulary among
       ``Ġ``, ``▁`` and the space, if it starts ≥ 1% of the token strings; else ``""``.
    """
    vocab = vocab_strings(tokenizer)
    votes = Counter(m for m in (_probe(tokenizer, w) for w in PROBE_WORDS) if m is not None)
    if votes:
        marker, _ = votes.most_common(1)[0]
        if marker == "" or _share(vocab, marker) >= _MIN_SHARE:
            return marker
    first = Counter(t[0] for t in vocab if t)
    best = max(_KNOWN, key=lambda c: first.get(c, 0))
    return best if _share(vocab, best) >= _MIN_SHARE else ""
