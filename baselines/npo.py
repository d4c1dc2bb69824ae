"""Negative preference optimisation (NPO, Zhang et al. 2024): minimise
−(2/β)·mean log σ(−β·(log π_θ(y|x) − log π_ref(y|x))) on the forget corpus, sequence-summed
log-probs, π_ref a frozen copy of θ0, plus α·R(retain) when retain_loss is ``nll`` (the
reference's default ``npo_grad_diff``) or ``kl`` (``npo_KL``); ``none`` is plain NPO.
Reference: licong-lin/negative-preference-optimization (β = 0.1, lr 1e-5, weight decay 0.01)."""

from __future__ import annotations

from typing import Literal

import torch

from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import split_batches
from mansu.unlearn.checks import UnlearnResult, check_common_knobs, require
from mansu.unlearn.likelihood import retain_term, sequence_logprobs
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.losses import npo_loss
from mansu.unlearn.optimizers import StorageAdamW, trainable_parameters
from mansu.unlearn.reference import frozen_copy


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            lr: float = 1e-5, max_steps: int = 100, batch_size: int = 4, beta: float = 0.1,
            retain_loss: Literal["none", "nll", "kl"] = "nll", alpha: float = 1.0,
            weight_decay: float = 0.01, max_length: int = 512,
            loss_tokens: Literal["answer", "all"] = "answer", train_embeddings: bool = True,
            stop_forget_acc: float | None = None, eval_every: int = 10) -> UnlearnResult:
    check_common_knobs("npo", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=stop_forget_acc, eval_every=eval_every)
    require(beta > 0, f"npo: beta must be > 0, got {beta}")
    require(retain_loss in ("none", "nll", "kl"),
            f"npo: retain_loss must be 'none', 'nll' or 'kl', got {retain_loss!r}")
    require(alpha >= 0, f"npo: alpha must be >= 0, got {alpha}")
    require(retain_loss == "none" or len(retain.corpus) > 0,
            f"npo: retain_loss={retain_loss!r} needs a retain corpus, and it is empty")
    reference = frozen_copy(model)
    params = [p for _, p in trainable_parameters(model, train_embeddings=train_embeddings)]
    optimizer = StorageAdamW(params, ctx.storage, lr=lr, weight_decay=weight_decay)
    batching = {"batch_size": batch_size, "device": ctx.device, "max_length": max_length,
                "loss_tokens": loss_tokens}
    forget_batches = split_batches(tokenizer, forget, seed=ctx.seed, **batching)
    retain_batches = (split_batches(tokenizer, retain, seed=ctx.seed + 1, **batching)
                      if retain_loss != "none" else None)

    def closure():
        batch = next(forget_batches)
        with torch.no_grad():
            logp_ref = sequence_logprobs(reference, batch)
        loss = npo_loss(sequence_logprobs(model, batch), logp_ref, beta)
        if retain_batches is not None:
            loss = loss + alpha * retain_term(retain_loss, model, next(retain_batches), reference)
        optimizer.backward(loss)
        return loss.detach()

    return run_unlearning(model, tokenizer, forget, ctx, optimizer, closure, max_steps=max_steps,
                          stop_forget_acc=stop_forget_acc, eval_every=eval_every,
                          info={"loss_tokens": loss_tokens})
