"""SimNPO (Fan et al. 2024): reference-free, length-normalised NPO,
−(2/β)·mean log σ(−(β/|y|)·log π_θ(y|x) − γ) on the forget corpus, plus α·NLL(retain) when
retain_loss is ``nll`` (the reference's ``simnpo_grad_diff``); ``none`` is plain SimNPO.
Reference: OPTML-Group/Unlearn-Simple (TOFU: β = 2.5, γ = 0, lr 1e-5, weight decay 0.01)."""

from __future__ import annotations

from typing import Literal

from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import split_batches
from mansu.unlearn.checks import UnlearnResult, check_common_knobs, require
from mansu.unlearn.likelihood import mean_nll, scored_token_counts, sequence_logprobs
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.losses import simnpo_loss
from mansu.unlearn.optimizers import StorageAdamW, trainable_parameters


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            lr: float = 1e-5, max_steps: int = 100, batch_size: int = 4, beta: float = 2.5,
            gamma: float = 0.0, retain_loss: Literal["none", "nll"] = "nll", alpha: float = 1.0,
            weight_decay: float = 0.01, max_length: int = 512,
            loss_tokens: Literal["answer", "all"] = "answer", train_embeddings: bool = True,
            stop_forget_acc: float | None = None, eval_every: int = 10) -> UnlearnResult:
    check_common_knobs("simnpo", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=stop_forget_acc, eval_every=eval_every)
    require(beta > 0, f"simnpo: beta must be > 0, got {beta}")
    require(retain_loss in ("none", "nll"),
            f"simnpo: retain_loss must be 'none' or 'nll', got {retain_loss!r}")
    require(alpha >= 0, f"simnpo: alpha must be >= 0, got {alpha}")
    require(retain_loss == "none" or len(retain.corpus) > 0,
            "simnpo: retain_loss='nll' needs a retain corpus, and it is empty")
    params = [p for _, p in trainable_parameters(model, train_embeddings=train_embeddings)]
    optimizer = StorageAdamW(params, ctx.storage, lr=lr, weight_decay=weight_decay)
    batching = {"batch_size": batch_size, "device": ctx.device, "max_length": max_length,
                "loss_tokens": loss_tokens}
    forget_batches = split_batches(tokenizer, forget, seed=ctx.seed, **batching)
    retain_batches = (split_batches(tokenizer, retain, seed=ctx.seed + 1, **batching)
                      if retain_loss == "nll" else None)

    def closure():
        batch = next(forget_batches)
        loss = simnpo_loss(sequence_logprobs(model, batch), scored_token_counts(batch), beta,
                           gamma)
        if retain_batches is not None:
            loss = loss + alpha * mean_nll(model, next(retain_batches))
        optimizer.backward(loss)
        return loss.detach()

    return run_unlearning(model, tokenizer, forget, ctx, optimizer, closure, max_steps=max_steps,
                          stop_forget_acc=stop_forget_acc, eval_every=eval_every,
                          info={"loss_tokens": loss_tokens})
