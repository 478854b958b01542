"""Conversations rendered with each tokenizer's own chat template (issue 19; docs/methods.md §1).

A chat record holds ``messages``, the conversation up to the answer to learn (``[{role, content}, ...]``, roles
``system`` / ``user`` / ``assistant``, ending with a user turn), and ``output``, the assistant's answer. Each model's
prompt is that history rendered by **its own** tokenizer's template with the generation prompt::

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

and the response is ``output`` itself: the same string on both sides, whatever their templates, so every alignment
over response characters (MinED, DSKD-CMA's positions, parent tokens, the lexical cost) stays exact. The rest of the
example is built as for any record (:mod:`prefkd.data.tokenize`), with one change: the token that ends the answer is
what the template writes after an assistant turn when that is one special token (ChatML's ``<|im_end|>``,
Llama-3's ``<|eot_id|>``), else the tokenizer's EOS (:func:`end_of_turn_id`).

:func:`check_verbatim` proves per example that the template does not rewrite the answer: the whole conversation
rendered with the answer must be ``prompt + output + (the template's end of turn)``; a template that trims, escapes or
reformats the content is an error naming the example. A tokenizer without a template gets ChatML
(:data:`DEFAULT_TEMPLATE`), said once per tokenizer in the log.
"""

from __future__ import annotations

import functools
import logging

from prefkd.data.records import DataError, check_messages

log = logging.getLogger(__name__)

# ChatML (OpenAI / Qwen / SmolLM style) without a default system turn: the template of a tokenizer that has none.
DEFAULT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def template_of(tokenizer) -> str:
    """The chat template this tokenizer renders with: its own, else :data:`DEFAULT_TEMPLATE` (logged once)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if own:
        return own
    _say_default(_name(tokenizer))
    return DEFAULT_TEMPLATE


@functools.cache
def _say_default(name: str) -> None:
    log.info("tokenizer %s has no chat template: conversations are rendered with ChatML (prefkd.data.chat."
             "DEFAULT_TEMPLATE); set the tokenizer's chat_template to use another", name)


def render(messages: list[dict], tokenizer, *, generation_prompt: bool, where: str = "conversation") -> str:
    """``messages`` as text in ``tokenizer``'s template (:func:`template_of`); a template that refuses them (e.g.
    Mistral's, for roles that do not alternate) is a :class:`DataError` naming ``where``."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template_of(tokenizer), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError (raise_exception in the template), or a missing variable
        raise DataError(f"{where}: the chat template of {_name(tokenizer)} cannot render this conversation "
                        f"({type(e).__name__}: {e}); fix the conversation's roles or set another chat_template") from e


def render_prompt(messages: list[dict], tokenizer, where: str = "conversation") -> str:
    """The model's prompt: the history in its template, ending with the generation prompt (the assistant's header)."""
    return render(messages, tokenizer, generation_prompt=True, where=where)


def prompt_of(record: dict, tokenizer, where: str = "record") -> str:
    """A record's prompt for one model: a chat record's history rendered by its template, else ``record["prompt"]``."""
    return render_prompt(record["messages"], tokenizer, where) if "messages" in record else record["prompt"]


def _after_answer(tokenizer) -> str:
    """What the template writes after an assistant answer (e.g. ``"<|im_end|>\\n"``), read off a probe; "" when it
    does not write the probe's answer verbatim (then every example fails :func:`check_verbatim`, naming itself)."""
    prompt = render(_PROBE[:1], tokenizer, generation_prompt=True, where="the probe conversation")
    full = render(_PROBE, tokenizer, generation_prompt=False, where="the probe conversation")
    answer = _PROBE[1]["content"]
    return full[len(prompt) + len(answer):] if full.startswith(prompt + answer) else ""


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an answer: the first token the template writes after an assistant turn when it is a
    special (or added) token, e.g. ``<|im_end|>``, ``<|eot_id|>``; else the tokenizer's EOS (a template whose turn
    end is plain text, such as ChatML on GPT-2's vocabulary, where ``<|im_end|>`` is 7 ordinary tokens)."""
    after = _after_answer(tokenizer)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return int(ids[0]) if ids and ids[0] in special else int(tokenizer.eos_token_id)


def check_verbatim(messages: list[dict], output: str, tokenizer, prompt: str, where: str) -> None:
    """The template writes the answer exactly as given: the conversation rendered with it is ``prompt + output +
    suffix``. Otherwise a :class:`DataError` naming ``where`` and what the template did."""
    full = render([*messages, {"role": "assistant", "content": output}], tokenizer, generation_prompt=False,
                  where=where)
    if full.startswith(prompt + output):
        return
    rest = full[len(prompt):] if full.startswith(prompt) else None
    if rest is None:
        what = "renders the history differently once the answer follows (the prompt is not a prefix)"
    elif rest.startswith(output.strip()):
        what = "trims the answer's surrounding whitespace (dataset.strip=true strips every message as read)"
    else:
        what = f"rewrites the answer (it renders {rest[:60]!r}..., the record holds {output[:60]!r}...)"
    raise DataError(f"{where}: the chat template of {_name(tokenizer)} {what}; both models must learn the same "
                    f"answer string, so prefkd needs the template to write it verbatim")


TRAIN_ON = ("last", "all")


def conversation_records(conversation: list[dict], train_on: str = "last", *, strip: bool = True,
                         where: str = "conversation") -> list[dict]:
    """The chat records (``{"messages": history, "output": answer}``) of one conversation (``[{role, content}, ...]``):
    ``train_on="last"``: its last turn, which must be the assistant's; ``"all"``: every assistant turn that follows a
    user turn, each with the conversation before it as its history (the same answers a multi-turn example trains,
    each as its own example). ``strip``: every turn's content without surrounding whitespace (as most templates
    write it)."""
    if train_on not in TRAIN_ON:
        raise DataError(f"dataset.source.train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
    check_messages(conversation, where, ends_with=None)
    turns = [{"role": t["role"], "content": t["content"].strip() if strip else t["content"]} for t in conversation]
    if train_on == "last":
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation ends with a {turns[-1]['role']!r} turn; with "
                            f"dataset.source.train_on=last it must end with the assistant's answer (or use "
                            f"train_on=all)")
        answers = [len(turns) - 1]
    else:
        answers = [k for k, t in enumerate(turns) if t["role"] == "assistant" and k > 0
                   and turns[k - 1]["role"] == "user"]
        if not answers:
            raise DataError(f"{where}: no assistant turn follows a user turn: nothing to learn")
    records = []
    for k in answers:
        if not turns[k]["content"].strip():
            raise DataError(f"{where}: turn {k} (the assistant's) is empty; give it an answer or drop it")
        check_messages(turns[:k], where)  # the history ends with the user's turn
        records.append({"messages": turns[:k], "output": turns[k]["content"]})
    return records
