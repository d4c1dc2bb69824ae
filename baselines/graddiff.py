"""Gradient difference: minimise −NLL(forget) + α·R(retain), R = NLL(retain) (``nll``) or
KL(π_ref ‖ π_θ) against a frozen copy of θ0 (``kl``), over every trainable parameter.
Reference: the TOFU/NPO code's ``grad_diff`` and ``KL`` losses (α = 1, AdamW, lr 1e-5)."""

from __future__ import annotations

from typing import Literal

from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import split_batches
from mansu.unlearn.checks import UnlearnResult, check_common_knobs, require
from mansu.unlearn.likelihood import mean_nll, retain_term
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.losses import graddiff_loss
from mansu.unlearn.optimizers import StorageAdamW, trainable_parameters
from mansu.unlearn.reference import frozen_copy


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            lr: float = 1e-5, max_steps: int = 100, batch_size: int = 4,
            retain_loss: Literal["nll", "kl"] = "nll", alpha: float = 1.0,
            weight_decay: float = 0.01, max_length: int = 512,
            loss_tokens: Literal["answer", "all"] = "answer", train_embeddings: bool = True,
            stop_forget_acc: float | None = None, eval_every: int = 10) -> UnlearnResult:
    check_common_knobs("graddiff", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=stop_forget_acc, eval_every=eval_every)
    require(retain_loss in ("nll", "kl"),
            f"graddiff: retain_loss must be 'nll' or 'kl', got {retain_loss!r}")
    require(alpha >= 0, f"graddiff: alpha must be >= 0, got {alpha}")
    require(len(retain.corpus) > 0, "graddiff: the retain corpus is empty")
    reference = frozen_copy(model) if retain_loss == "kl" else None
    params = [p for _, p in trainable_parameters(model, train_embeddings=train_embeddings)]
    optimizer = StorageAdamW(params, ctx.storage, lr=lr, weight_decay=weight_decay)
    batching = {"batch_size": batch_size, "device": ctx.device, "max_length": max_length,
                "loss_tokens": loss_tokens}
    forget_batches = split_batches(tokenizer, forget, seed=ctx.seed, **batching)
    retain_batches = split_batches(tokenizer, retain, seed=ctx.seed + 1, **batching)

    def closure():
        loss = graddiff_loss(mean_nll(model, next(forget_batches)),
                             retain_term(retain_loss, model, next(retain_batches), reference),
                             alpha)
        optimizer.backward(loss)
        return loss.detach()

    return run_unlearning(model, tokenizer, forget, ctx, optimizer, closure, max_steps=max_steps,
                          stop_forget_acc=stop_forget_acc, eval_every=eval_every,
                          info={"loss_tokens": loss_tokens})
