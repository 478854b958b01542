"""Output heads read off a causal LM, so that a loss can project logits chunk by chunk (issue 17).

:func:`output_head` describes a model's output head as an :class:`OutputHead` (weight, bias, logit scale, final
soft-capping, real vocabulary size); :meth:`OutputHead.project` then computes, from rows of the last hidden state,
exactly the logits the model itself computes. :func:`forward_hidden` runs a model's body without building its
logits, and :func:`check_output_head` proves on a probe input that the two together give the model's own logits.

Conventions of transformers 5 read here: ``get_output_embeddings()`` is the head module (the input embedding for a
tied head: the same parameter); ``config.get_text_config()`` holds the text model's settings (multimodal configs nest
them); ``final_logit_softcapping`` (Gemma-2 style: z ← cap·tanh(z/cap)) and ``logit_scale`` (Cohere style: z ← s·z)
are applied after the linear map; causal LMs accept ``logits_to_keep`` (an int or a 1-D index tensor of positions,
``slice_logits_to_keep``), and the last entry of ``hidden_states`` is the final hidden state, final norm applied;
``get_decoder()`` is the body whose output's first element is that state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output head: logits = cap·tanh(scale·(h Wᵀ + b) / cap), the tanh only with a soft cap.

    weight: V×H (the model's parameter itself, so its gradient reaches the model); bias: V or None.
    logit_scale: multiplier of the linear map's output (1.0: none). softcap: ``final_logit_softcapping`` or None.
    vocab_size: the real vocabulary (``config.vocab_size``; ≤ V). Rows beyond it are padding rows the model still
    scores: :meth:`project` returns all V columns, as the model's own logits have them.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None

    def __post_init__(self):
        if self.weight.dim() != 2:
            raise ValueError(f"OutputHead.weight must be V×H, got shape {tuple(self.weight.shape)}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"OutputHead.softcap must be > 0 or None, got {self.softcap}")

    @property
    def rows(self) -> int:
        """V: the number of logits per position (the weight's rows, padding rows included)."""
        return self.weight.shape[0]

    def linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """h Wᵀ + b: ...×H -> ...×V in the weight's dtype (as the model's own head computes it)."""
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        """The element-wise rest of the head on the linear map's output z (...×V, any dtype): scale, then soft cap."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def finish_grad(self, finished: torch.Tensor) -> torch.Tensor:
        """d finish(z)/dz element-wise, from the finished values themselves: s·(1 − (y/c)²) under a soft cap c
        (y = c·tanh(s·z/c)), else the scale s."""
        if self.softcap is None:
            return torch.full_like(finished, self.logit_scale)
        return self.logit_scale * (1 - (finished / self.softcap).square())

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from rows of its last hidden state: n×H (or ...×H) -> n×V, in the weight's dtype."""
        return self.finish(self.linear(hidden))

    def detach(self) -> OutputHead:
        """The same head with its weight and bias detached (read without gradient)."""
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())


def _base_model(model: nn.Module) -> nn.Module:
    """The causal LM under a peft wrapper (``get_base_model()``), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _number(config, key: str) -> float | None:
    """``config.key`` as a float, or None when absent or null."""
    value = getattr(config, key, None)
    return None if value is None else float(value)


def output_head(model: nn.Module) -> OutputHead | None:
    """The :class:`OutputHead` of a causal LM (transformers' tied or untied heads: GPT-2, LLaMA, Qwen2 and the
    like; a peft LoRA student's base head when the head itself carries no adapter), or None for anything this does
    not recognise: no ``get_output_embeddings()``, or a head that is not a plain ``nn.Linear`` (a LoRA-wrapped or
    quantised head, a peft ``modules_to_save`` copy). The parameters are the model's own (not copies), so read the
    head again after anything that swaps them (FSDP)."""
    base = _base_model(model)
    get_head = getattr(base, "get_output_embeddings", None)
    try:
        head = get_head() if callable(get_head) else None
    except (NotImplementedError, AttributeError):  # models without a text head raise instead of returning None
        return None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return None
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = _number(config, "logit_scale")
    vocab = getattr(config, "vocab_size", None)
    return OutputHead(weight=head.weight, bias=head.bias, logit_scale=1.0 if scale is None else scale,
                      softcap=_number(config, "final_logit_softcapping"),
                      vocab_size=min(int(vocab), head.weight.shape[0]) if vocab else head.weight.shape[0])


def _forward_without_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """The model's own forward (compiled, hooked or peft-wrapped alike) with ``logits_to_keep`` an empty index
    tensor: its head projects no position (logits B×0×V), and ``hidden_states[-1]`` is the head's input."""
    keep = torch.empty(0, dtype=torch.long, device=input_ids.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                 logits_to_keep=keep)


def _decoder(model: nn.Module) -> nn.Module | None:
    """The body whose output's first element is the head's input (transformers' ``get_decoder()``), or None when the
    model has no separate one."""
    base = _base_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (NotImplementedError, AttributeError, ValueError):
        return None
    return decoder if isinstance(decoder, nn.Module) and decoder is not base else None


def _decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                    ) -> torch.Tensor | None:
    """The last hidden state (B×T×H) caught at the output of the model's decoder during the model's own forward
    without logits and without ``output_hidden_states``, so the states of the other layers die as the forward goes
    on; None when the model has no separate decoder."""
    decoder = _decoder(model)
    if decoder is None:
        return None
    caught = []
    handle = decoder.register_forward_hook(lambda module, args, out: caught.append(out[0]))
    try:
        keep = torch.empty(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    finally:
        handle.remove()
    return caught[-1] if caught else None


def forward_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The last hidden state (B×T×H, final norm applied) of a causal LM's forward pass that builds no logits.

    Without gradient (a teacher, a reference model) the state is caught at the decoder's output, so the L + 1 hidden
    states of ``output_hidden_states`` never live at once: for a deep model they outweigh the logits themselves
    ((L + 1)·H > V for Mistral-7B). With gradient the layers' outputs are kept for backward anyway, and the model's
    own forward with ``output_hidden_states`` is used (a hook would break a compiled student's graph)."""
    if not torch.is_grad_enabled():
        hidden = _decoder_hidden(model, input_ids, attention_mask)
        if hidden is not None:
            return hidden
    return _forward_without_logits(model, input_ids, attention_mask).hidden_states[-1]


@torch.no_grad()
def check_output_head(model: nn.Module, head: OutputHead, length: int = 6) -> str | None:
    """None when ``head.project`` of :func:`forward_hidden`'s states equals the model's own logits on a probe input
    (tokens 0..length-1, eval mode); otherwise why not (the forward without logits failed or still built logits, or
    a logit transform the adapter does not know, such as Granite's ``logits_scaling``)."""
    ids = (torch.arange(length, device=head.weight.device) % head.rows).unsqueeze(0)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        without = _forward_without_logits(model, ids, mask)
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:
        return f"its forward without logits failed ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    if without.logits is not None and without.logits.shape[1] != 0:
        return "its forward ignores logits_to_keep (it would still build the logits)"
    projected = head.project(without.hidden_states[-1])
    if projected.shape != own.shape:
        return f"its head gives logits of shape {tuple(projected.shape)}, the model {tuple(own.shape)}"
    tol = 1e-4 if own.dtype in (torch.float32, torch.float64) else 2e-2

    def gap(logits: torch.Tensor) -> float | None:  # None: within tolerance
        value = (logits.float() - own.float()).abs().max().item()
        return value if value > tol * (1.0 + own.float().abs().max().item()) else None

    if (value := gap(projected)) is not None:
        return (f"head(last hidden state) differs from the model's own logits by {value:.3g} (a logit transform the "
                f"head adapter does not know)")
    caught = _decoder_hidden(model, ids, mask)  # where the forward without gradient reads the state
    if caught is not None and caught.shape != without.hidden_states[-1].shape:
        return f"its decoder's output has shape {tuple(caught.shape)}, not the head's input's"
    if caught is not None and (value := gap(head.project(caught))) is not None:
        return f"head(its decoder's output) differs from the model's own logits by {value:.3g}"
    return None


def head_problem(model: nn.Module) -> str | None:
    """Why ``model``'s logits cannot be projected from its last hidden state (the head adapter does not recognise its
    head, or :func:`check_output_head` finds the projection differs from its own logits), or None when they can."""
    head = output_head(model)
    if head is None:
        get_head = getattr(model, "get_output_embeddings", None)
        module = get_head() if callable(get_head) else None
        return f"the head adapter does not recognise its output head ({type(module).__name__})"
    return check_output_head(model, head)


def fusable_head(model: nn.Module) -> OutputHead | None:
    """``model``'s :class:`OutputHead` when its logits may be projected chunk by chunk from its last hidden state
    (:func:`head_problem` finds nothing), else None: the logits must be built."""
    return output_head(model) if head_problem(model) is None else None
