"""SURE (Zhang et al., ICLR 2025, "Catastrophic failure of LLM unlearning via quantization"):
saliency-restricted unlearning with a larger learning rate. Each step computes the forget
gradient, keeps only the weight rows whose gradient L2 norm reaches the `percentile`-th
percentile of all rows' norms (pooled over every trained matrix), and updates those rows alone:
the optimizer update, not only the gradient, is masked, so weight decay and Adam's momentum
never move an unselected row. Loss: −NLL(forget) + retain_alpha·NLL(retain) (GradDiff; 0 gives
plain GA); the saliency comes from the forget term alone. Trained: every 2-D weight (embeddings
too unless train_embeddings=false); 1-D parameters (norm gains, biases) have no rows and stay.
A row is dim 0 of the stored weight: an output unit of nn.Linear (GPT-2's Conv1D stores [in, out],
so there it is an input unit)."""

from __future__ import annotations

import torch

from mansu.context import RunContext
from mansu.data import Split
from mansu.losses import ga_loss
from mansu.training import (
    StorageAdamW,
    UnlearnResult,
    check_common_knobs,
    mean_nll,
    require,
    run_unlearning,
    text_batches,
    trainable_parameters,
)


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            lr: float = 1e-4, max_steps: int = 100, batch_size: int = 4,
            percentile: float = 90.0, retain_alpha: float = 1.0, weight_decay: float = 0.01,
            max_length: int = 512, train_embeddings: bool = True,
            stop_forget_acc: float | None = None, eval_every: int = 10) -> UnlearnResult:
    check_common_knobs("sure", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=stop_forget_acc, eval_every=eval_every)
    require(0 < percentile < 100, f"sure: percentile must be in (0, 100), got {percentile}")
    require(retain_alpha >= 0, f"sure: retain_alpha must be >= 0, got {retain_alpha}")
    require(retain_alpha == 0 or len(retain.corpus) > 0,
            "sure: retain_alpha > 0 needs a retain corpus, and it is empty")
    params = [p for _, p in trainable_parameters(model, train_embeddings=train_embeddings)
              if p.dim() == 2]
    optimizer = StorageAdamW(params, ctx.storage, lr=lr, weight_decay=weight_decay)
    batching = {"batch_size": batch_size, "device": ctx.device, "max_length": max_length}
    forget_batches = text_batches(tokenizer, forget.corpus, seed=ctx.seed, **batching)
    retain_batches = (text_batches(tokenizer, retain.corpus, seed=ctx.seed + 1, **batching)
                      if retain_alpha > 0 else None)
    selected: list[torch.Tensor] = []
    selected_share: list[float] = []

    def closure():
        forget_loss = ga_loss(mean_nll(model, next(forget_batches)))
        optimizer.backward(forget_loss)
        selected[:] = salient_rows(params, percentile)
        selected_share.append(torch.cat([m.flatten() for m in selected]).float().mean().item())
        loss = forget_loss.detach()
        if retain_batches is not None:
            retain_loss = retain_alpha * mean_nll(model, next(retain_batches))
            optimizer.backward(retain_loss)
            loss = loss + retain_loss.detach()
        return loss

    result = run_unlearning(model, tokenizer, forget, ctx, optimizer, closure,
                            max_steps=max_steps, stop_forget_acc=stop_forget_acc,
                            eval_every=eval_every, update_masks=lambda: selected)
    result.info["selected_row_share_mean"] = sum(selected_share) / len(selected_share)
    return result


def salient_rows(params: list[torch.nn.Parameter], percentile: float) -> list[torch.Tensor]:
    """Per matrix, a [rows, 1] mask of the rows whose gradient L2 norm is at least the
    `percentile`-th percentile of all rows' norms; a row with zero gradient is never salient."""
    norms = [torch.zeros(p.shape[0], device=p.device) if p.grad is None
             else torch.linalg.vector_norm(p.grad, dim=1, dtype=torch.float32) for p in params]
    pooled = torch.cat([n.to(norms[0].device) for n in norms])
    threshold = torch.quantile(pooled, percentile / 100.0)
    return [((n >= threshold.to(n.device)) & (n > 0)).unsqueeze(1) for n in norms]
