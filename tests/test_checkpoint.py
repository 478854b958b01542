"""prefkd.training.checkpoint on its own: what a loss module keeps besides tensors (``get_extra_state`` returning plain
Python values) survives a save and a load, next to its tensors, the model, the optimizer and the scheduler."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from prefkd.losses.base import DistillationLoss
from prefkd.models.tiny import build_tiny
from prefkd.training import checkpoint as ckpt
from prefkd.training.distill_module import DistillModule


class LossWithExtraState(DistillationLoss):
    """A loss module with a tensor (a projector) and non-tensor state (a counter and a history list)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.calls, self.history = 0, []

    def get_extra_state(self) -> dict:
        return {"calls": self.calls, "history": list(self.history)}

    def set_extra_state(self, state: dict) -> None:
        self.calls, self.history = state["calls"], list(state["history"])


def test_non_tensor_loss_state_round_trips(tmp_path):
    acc = Accelerator(cpu=True)
    bundle = build_tiny("a", "llama", 16, num_layers=1, seed=0)
    loss = LossWithExtraState()
    loss.calls, loss.history = 7, [0.5, 0.25]
    params = list(bundle.model.parameters()) + list(loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    bundle.model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    dest = ckpt.save_checkpoint(tmp_path / "step-1", accelerator=acc, module=DistillModule(bundle.model, loss),
                                tokenizer=bundle.tokenizer, optimizer=optimizer, scheduler=scheduler,
                                state={"global_step": 1})
    assert (dest / ckpt.STATE_DIR / ckpt.LOSS_EXTRA).is_file() and (dest / ckpt.PROJECTORS).is_file()
    # each part keeps its own keys (checkpoints from before the student and the loss shared one module load as ever)
    assert set(load_file(str(dest / ckpt.PROJECTORS))) == {"proj.weight", "proj.bias"}
    assert set(load_file(str(dest / "model.safetensors"))) <= set(bundle.model.state_dict())

    fresh = LossWithExtraState()
    model = build_tiny("a", "llama", 16, num_layers=1, seed=5).model
    opt2 = torch.optim.AdamW(list(model.parameters()) + list(fresh.parameters()), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1.0)
    state = ckpt.load_checkpoint(dest, accelerator=acc, module=DistillModule(model, fresh), optimizer=opt2,
                                 scheduler=sched2)
    assert state == {"global_step": 1}
    assert fresh.calls == 7 and fresh.history == [0.5, 0.25]
    assert torch.equal(fresh.proj.weight, loss.proj.weight)
    for a, b in zip(model.parameters(), bundle.model.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
