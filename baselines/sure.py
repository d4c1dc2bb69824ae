"""SURE (Zhang et al., ICLR 2025, "Catastrophic failure of LLM unlearning via quantization";
reference code zzwjames/FailureLLMUnlearning, baselines/baselines/iterative.py, class SURE).
Each step computes the forget gradient and selects the "salient" units whose gradient norm reaches
the `percentile`-th percentile of all units' norms: a unit is a row (dim 0) of a ≥2-D weight, and
with pool_1d every single entry of a 1-D parameter (norm gains, biases) is a unit of its own,
pooled into the same percentile. Loss: −NLL(forget) + retain_alpha·NLL(retain) (GradDiff; 0 gives
plain GA); the saliency comes from the forget term alone.

Two ways to restrict the step (``mask``):
- ``gradient`` (the reference, the default ``sure``): the gradient is multiplied by the mask
  (its ``grad.mul_(mask)``) before an ordinary AdamW step, so an unselected row still moves by its
  Adam momentum from earlier steps and by weight decay.
- ``update`` (``sure_update_mask``, this project's earlier SURE): the optimizer's update itself is
  masked, so nothing moves an unselected row.

Reference settings (its it_unlearn defaults and scripts): percentile 90, lr 1e-5 (its scripts;
1e-4 in its learning-rate sweep), HF TrainingArguments' default weight decay 0, every parameter
trained. Two things of the reference are not reproduced: it backpropagates the forget loss twice
(once for the saliency, once in the Trainer's step), i.e. steps on 2·∇F + α·∇R, which under Adam
equals ∇F + (α/2)·∇R; and Hugging Face's Trainer clips the gradient norm to 1.
A row is dim 0 of the stored weight: an output unit of nn.Linear (GPT-2's Conv1D stores [in, out],
so there it is an input unit)."""

from __future__ import annotations

from typing import Literal

import torch

from mansu.unlearn.checks import UnlearnResult, require
from mansu.unlearn.likelihood import mean_nll
from mansu.unlearn.losses import ga_loss
from mansu.unlearn.scaffold import Training, baseline


@baseline("sure", weight_decay=0.0)
def unlearn(training: Training, *, mask: Literal["gradient", "update"] = "gradient",
            pool_1d: bool = True, percentile: float = 90.0, retain_alpha: float = 1.0
            ) -> UnlearnResult:
    require(mask in ("gradient", "update"),
            f"sure: mask must be 'gradient' or 'update', got {mask!r}")
    require(0 < percentile < 100, f"sure: percentile must be in (0, 100), got {percentile}")
    require(retain_alpha >= 0, f"sure: retain_alpha must be >= 0, got {retain_alpha}")
    require(retain_alpha == 0 or len(training.retain.corpus) > 0,
            "sure: retain_alpha > 0 needs a retain corpus, and it is empty")
    model = training.model
    params = [p for p in training.parameters() if p.dim() >= 2 or pool_1d]
    optimizer = training.optimizer(params)
    forget_batches = training.forget_batches()
    retain_batches = training.retain_batches() if retain_alpha > 0 else None
    selected: list[torch.Tensor] = []
    selected_share: list[float] = []

    def closure():  # two backward passes, the saliency from the first: not training.train's one
        forget_loss = ga_loss(mean_nll(model, next(forget_batches)))
        optimizer.backward(forget_loss)
        selected[:] = salient_units(params, percentile)
        selected_share.append(torch.cat([m.expand_as(p).flatten() for m, p in
                                         zip(selected, params)]).float().mean().item())
        loss = forget_loss.detach()
        if retain_batches is not None:
            retain_loss = retain_alpha * mean_nll(model, next(retain_batches))
            optimizer.backward(retain_loss)
            loss = loss + retain_loss.detach()
        if mask == "gradient":
            for p, keep in zip(params, selected):
                if p.grad is not None:
                    p.grad = p.grad * keep  # out of place: autograd may hand back a view
        return loss

    result = training.run(optimizer, closure, info={"mask": mask},
                          update_masks=(lambda: selected) if mask == "update" else None)
    result.info["selected_share_mean"] = sum(selected_share) / len(selected_share)
    return result


def salient_units(params: list[torch.nn.Parameter], percentile: float) -> list[torch.Tensor]:
    """Per parameter, a mask broadcastable to it ([rows, 1, ...] for ≥2-D, [n] for 1-D) of the
    units whose gradient L2 norm (|g| for a 1-D entry) is at least the `percentile`-th percentile
    of all units' norms, pooled over every parameter; a unit with zero gradient is never salient."""
    norms = []
    for p in params:
        if p.grad is None:
            norms.append(torch.zeros(p.shape[0], device=p.device))
        elif p.dim() == 1:
            norms.append(p.grad.float().abs())
        else:
            norms.append(torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=torch.float32))
    pooled = torch.cat([n.to(norms[0].device) for n in norms])
    threshold = _percentile(pooled, percentile)
    return [((n >= threshold.to(n.device)) & (n > 0)).view(-1, *[1] * (p.dim() - 1))
            for n, p in zip(norms, params)]


def _percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """numpy's default (linear) percentile, as the reference computes it; torch.quantile refuses
    inputs above 2^24 entries, which a 7-8B model's rows and 1-D entries can exceed."""
    ordered = values.sort().values
    position = (ordered.numel() - 1) * percentile / 100.0
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
