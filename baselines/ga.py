"""Gradient ascent (GA): minimise −NLL(forget) over every trainable parameter (embeddings too,
unless train_embeddings=false). Reference: the TOFU/NPO code's ``grad_ascent`` (AdamW, lr 1e-5,
weight decay 0.01), at a constant learning rate and counted in steps."""

from __future__ import annotations

from typing import Literal

from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import split_batches
from mansu.unlearn.checks import UnlearnResult, check_common_knobs
from mansu.unlearn.likelihood import mean_nll
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.losses import ga_loss
from mansu.unlearn.optimizers import StorageAdamW, trainable_parameters


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            lr: float = 1e-5, max_steps: int = 100, batch_size: int = 4,
            weight_decay: float = 0.01, max_length: int = 512,
            loss_tokens: Literal["answer", "all"] = "answer", train_embeddings: bool = True,
            stop_forget_acc: float | None = None, eval_every: int = 10) -> UnlearnResult:
    check_common_knobs("ga", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=stop_forget_acc, eval_every=eval_every)
    params = [p for _, p in trainable_parameters(model, train_embeddings=train_embeddings)]
    optimizer = StorageAdamW(params, ctx.storage, lr=lr, weight_decay=weight_decay)
    forget_batches = split_batches(tokenizer, forget, loss_tokens=loss_tokens,
                                   batch_size=batch_size, seed=ctx.seed, device=ctx.device,
                                   max_length=max_length)

    def closure():
        loss = ga_loss(mean_nll(model, next(forget_batches)))
        optimizer.backward(loss)
        return loss.detach()

    return run_unlearning(model, tokenizer, forget, ctx, optimizer, closure, max_steps=max_steps,
                          stop_forget_acc=stop_forget_acc, eval_every=eval_every,
                          info={"loss_tokens": loss_tokens})
