"""MANSU's optimizer: AdamW over the masked entries alone, so its state is |M| entries, never the
size of the model; every step projected (null space) after the optimizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mansu.unlearn.checks import require
from mansu.unlearn.mansu.mask import MaskedWeight, gathered_gradients
from mansu.unlearn.mansu.nullspace import Projector


class MaskedAdamW:
    """AdamW whose parameters are the masked entries alone, one flat tensor per weight, so each
    moment holds exactly |M| entries. After every AdamW step the step is projected (``project``:
    flat step over all entries -> projected step) and written into the weights. Storage as in
    mansu.unlearn.loop: ``fp32``; ``bf16``, the gathered bf16 values stepped directly (a step below
    half an ulp rounds away); ``bf16_master``, fp32 copies stepped and written back rounded.
    It offers what run_unlearning uses of StorageAdamW: params, zero_grad, backward, step."""

    def __init__(self, masked: Sequence[MaskedWeight], storage: str, *, lr: float,
                 weight_decay: float = 0.0, project: Projector | None = None):
        self.masked = list(masked)
        self.params = [m.param for m in self.masked]
        expected = torch.float32 if storage == "fp32" else torch.bfloat16
        wrong = {p.dtype for p in self.params} - {expected}
        require(not wrong, f"mansu: storage {storage!r} needs {expected} weights, found {wrong}")
        dtype = torch.bfloat16 if storage == "bf16" else torch.float32
        self.values = [m.current().to(dtype).clone() for m in self.masked]
        self.sizes = [v.numel() for v in self.values]
        self.optimizer = torch.optim.AdamW(self.values, lr=lr, weight_decay=weight_decay)
        self.project = project

    def zero_grad(self) -> None:
        for value in self.values:
            value.grad = None

    def backward(self, loss: Tensor) -> None:
        with gathered_gradients(self.masked) as parts:
            loss.backward()
        for value, part in zip(self.values, parts):
            if part is not None:
                part = part.to(value.dtype)
                value.grad = part if value.grad is None else value.grad + part

    @torch.no_grad()
    def step(self, update_masks=None) -> None:
        if update_masks is not None:
            raise ValueError("MaskedAdamW steps the masked entries only; it takes no update_masks")
        before = [value.clone() for value in self.values]
        self.optimizer.step()
        if self.project is not None:
            step = self.project(torch.cat([(v.float() - b.float())
                                           for v, b in zip(self.values, before)]))
            for value, old, part in zip(self.values, before, step.split(self.sizes)):
                value.copy_(old.float() + part)
        for m, value in zip(self.masked, self.values):
            m.write(value)

    def state_entries(self) -> dict[str, int]:
        """Entries per kind of optimizer state, summed over the weights (``step`` counters
        excluded) and of the stepped values themselves."""
        counts = {"values": sum(self.sizes)}
        for state in self.optimizer.state.values():
            for key, tensor in state.items():
                if key != "step":
                    counts[key] = counts.get(key, 0) + tensor.numel()
        return counts


