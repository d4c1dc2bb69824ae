"""The step loop every method shares: its divergence check and optional forget-accuracy stop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mansu.context import RunContext
from mansu.data import Split
from mansu.evaluate.mcq import evaluate_mcq
from mansu.unlearn.checks import UnlearningDiverged, UnlearnResult
from mansu.unlearn.optimizers import StorageAdamW, UpdateMasks


def run_unlearning(model: nn.Module, tokenizer, forget: Split, ctx: RunContext,
                   optimizer: StorageAdamW, closure: Callable[[], torch.Tensor], *,
                   max_steps: int, stop_forget_acc: float | None = None, eval_every: int = 10,
                   update_masks: Callable[[], UpdateMasks] | None = None,
                   info: dict | None = None) -> UnlearnResult:
    """Run up to `max_steps` optimizer steps. Each step calls `closure`, which computes the loss,
    backpropagates it (``optimizer.backward``) and returns it; `update_masks`, called after the
    closure, restricts the update. A non-finite loss raises UnlearningDiverged before the step,
    a non-finite trained parameter right after it.
    With `stop_forget_acc`, forget accuracy (ctx.scoring) is measured every `eval_every` steps
    and training stops once it is <= stop_forget_acc."""
    was_training = model.training
    model.train()
    losses: list[float] = []
    forget_acc_trace: list[list[float]] = []
    stopped_early = False
    try:
        for step in range(1, max_steps + 1):
            optimizer.zero_grad()
            loss = float(closure())
            if not math.isfinite(loss):
                raise UnlearningDiverged(f"loss became {loss} at step {step}")
            optimizer.step(update_masks() if update_masks is not None else None)
            _check_finite_parameters(model, optimizer.params, step)
            losses.append(loss)
            if stop_forget_acc is not None and step % eval_every == 0:
                accuracy = _forget_accuracy(model, tokenizer, forget, ctx)
                forget_acc_trace.append([step, accuracy])
                if accuracy <= stop_forget_acc:
                    stopped_early = step < max_steps
                    break
    finally:
        optimizer.zero_grad()
        model.train(was_training)
    record = {"storage": ctx.storage, "stopped_early": stopped_early,
              "trained_tensors": len(optimizer.params),
              "trained_parameters": sum(p.numel() for p in optimizer.params)}
    if stop_forget_acc is not None:
        record["forget_acc_trace"] = forget_acc_trace
    return UnlearnResult(model=model, steps=len(losses), losses=losses,
                         info={**record, **(info or {})})


def _check_finite_parameters(model: nn.Module, params: Sequence[nn.Parameter], step: int) -> None:
    finite = torch.stack([torch.isfinite(p).all() for p in params])
    if not bool(finite.all()):
        bad = params[int((~finite).nonzero()[0])]
        name = next((n for n, p in model.named_parameters() if p is bad), "?")
        raise UnlearningDiverged(f"parameter {name} became NaN/inf at step {step}")


def _forget_accuracy(model, tokenizer, forget: Split, ctx: RunContext) -> float:
    model.eval()
    result = evaluate_mcq(model, tokenizer, forget.questions, scoring=ctx.scoring,
                          bootstrap_iters=1, seed=ctx.seed)  # the interval is unused
    model.train()
    return result.accuracy
