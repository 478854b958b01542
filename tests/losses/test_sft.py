"""SFTLoss: the summed cross-entropy over labelled positions."""

from __future__ import annotations

import pytest
import torch

from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.sft import SFTLoss


def make_inputs(B=3, T=7, V=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100
    labels[2, 5:] = -100
    logits = torch.randn(B, T, V, generator=g).to(dtype).requires_grad_(True)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), "labels": labels}
    return LossInputs(batch=batch, student=ModelOutputs(logits=logits))


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_sum_of_cross_entropy(chunk_size):
    inputs = make_inputs()
    out = SFTLoss(chunk_size=chunk_size)(inputs)
    out.loss.backward()
    ref_logits = inputs.student.logits.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(
        ref_logits.flatten(0, 1), inputs.batch["labels"].flatten(), ignore_index=-100, reduction="sum"
    )
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.metrics["ce"], out.loss.detach())
    torch.testing.assert_close(inputs.student.logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert (inputs.student.logits.grad[inputs.batch["labels"] == -100] == 0).all()


def test_needs_nothing_but_the_student():
    assert SFTLoss.needs == Needs()
    assert SFTLoss().trainable_modules() == []


def test_bf16_logits():
    inputs = make_inputs(dtype=torch.bfloat16, seed=1)
    out = SFTLoss()(inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and inputs.student.logits.grad.dtype == torch.bfloat16
