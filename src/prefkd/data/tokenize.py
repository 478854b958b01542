"""Tokenisation of one (prompt, output) pair for one model (docs/methods.md §1, the DSKD/MiniLLM convention).

Prompt and output are tokenised separately with ``add_special_tokens=False`` (no BOS). The output is plain text:
the string of a special token in it (``<s>``, ``</s>``, ``<|endoftext|>``) is tokenised as text
(``split_special_tokens=True``), so no BOS, EOS or other special token is ever a label inside a response; the
prompt, already templated (a chat template's ``<|im_start|>``), keeps its special tokens. The prompt ids are
cut to ``max_prompt_length`` (the first tokens are kept; a rendered conversation keeps its last), EOS (a chat
record's: the template's end of turn, :mod:`prefkd.data.chat`) is appended to the response ids, and the
whole sequence ``full = prompt + response + [eos]`` is cut to ``max_length``. The model sees
``input_ids = full[:-1]`` and is trained on ``labels = full[1:]`` with -100 where the target is a prompt
token, so ``labels[i]`` is the target predicted at position i and the first label that is not -100 is
the first response token (at position ``prompt_length - 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefkd.data.records import DataError
from prefkd.utils.labels import IGNORE_INDEX


@dataclass
class TokenizedExample:
    """One example for one model. Lengths: ``len(input_ids) == len(labels) == len(full_ids) - 1``.

    input_ids: full[:-1]. labels: full[1:], -100 on the ``prompt_length - 1`` prompt targets.
    prompt_length: prompt tokens kept in ``full``. prompt_truncated: the prompt was cut to
    max_prompt_length. sequence_truncated: the whole sequence was cut to max_length (EOS then missing).
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    prompt_truncated: bool = False
    sequence_truncated: bool = False

    @property
    def full_ids(self) -> list[int]:
        """prompt + response (+ EOS unless truncated), length n + 1."""
        return self.input_ids + self.labels[-1:]

    @property
    def response_ids(self) -> list[int]:
        """The response tokens kept (EOS included unless the sequence was truncated)."""
        return self.full_ids[self.prompt_length:]


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token pad := eos (docs/methods.md §1); returns the tokenizer. No eos: an error."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no EOS "
                        f"token; prefkd appends EOS to every response: set tokenizer.eos_token first.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(tokenizer, texts: Sequence[str], split_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text, ``add_special_tokens=False`` (batched: fast tokenizers run in parallel).
    ``split_special_tokens=True`` (responses): special tokens' strings in the text are tokenised as text."""
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False,
                    split_special_tokens=split_special_tokens)
    return [list(ids) for ids in out["input_ids"]]


def build_example(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int,
                  max_prompt_length: int = 256, max_length: int = 512, where: str = "example", *,
                  ended: bool = True, allow_empty: bool = False, keep_prompt_end: bool = False) -> TokenizedExample:
    """Assemble a :class:`TokenizedExample` from already tokenised prompt and response ids (no EOS yet).

    For sampled responses (:mod:`prefkd.training.on_policy`): ``ended=False`` (cut by the sampling budget) appends
    no EOS, so no EOS is learnt where the response did not end; ``allow_empty=True`` accepts an empty response that
    ended at once (the example is the prompt and EOS: the model learns whether to stop there). A dataset's response
    always ends and is never empty. ``keep_prompt_end``: a prompt longer than ``max_prompt_length`` keeps its LAST
    tokens (a rendered conversation, whose end is the latest turn and the assistant's header), not its first."""
    if max_length < 2 or max_prompt_length < 1 or max_prompt_length >= max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length and max_length >= 2, got "
                         f"max_prompt_length={max_prompt_length}, max_length={max_length}.")
    if not prompt_ids:
        raise DataError(f"{where}: the prompt tokenises to nothing; the first response token needs a prompt "
                        f"position to be predicted from.")
    if not response_ids and not (allow_empty and ended):
        raise DataError(f"{where}: the output tokenises to nothing; give the record a non-empty output.")
    prompt_truncated = len(prompt_ids) > max_prompt_length
    prompt = list(prompt_ids[-max_prompt_length:] if keep_prompt_end else prompt_ids[:max_prompt_length])
    full = prompt + list(response_ids) + ([int(eos_id)] if ended else [])
    sequence_truncated = len(full) > max_length
    full = full[:max_length]
    p = len(prompt)
    labels = [IGNORE_INDEX] * (p - 1) + full[p:]
    return TokenizedExample(input_ids=full[:-1], labels=labels, prompt_length=p,
                            prompt_truncated=prompt_truncated, sequence_truncated=sequence_truncated)


def tokenize_pair(prompt: str, output: str, tokenizer, max_prompt_length: int = 256, max_length: int = 512,
                  where: str = "example") -> TokenizedExample:
    """Tokenise one (prompt, output) pair for one model (see the module docstring).

    Raises :class:`DataError` (naming ``where``) for an empty or whitespace-only output or prompt, and for a
    tokenizer without EOS.
    """
    if not isinstance(output, str) or not output.strip():
        raise DataError(f"{where}: the output is empty ({output!r}); every training example needs a "
                        f"non-empty response.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: the prompt is empty ({prompt!r}).")
    ensure_pad_token(tokenizer)
    (prompt_ids,), (response_ids,) = encode(tokenizer, [prompt]), encode(tokenizer, [output], split_special_tokens=True)
    return build_example(prompt_ids, response_ids, tokenizer.eos_token_id, max_prompt_length, max_length, where)
