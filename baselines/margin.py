"""QUAIL-style logit-margin unlearning (Mishra & Mehreen 2026, "QUAIL: Quantization Aware
Unlearning", arXiv 2601.15538): GA + GDR plus a logit-space hinge that pushes the forget answers'
logits a margin beyond where NF4's own logit error could bring them back:

L = ga_weight·(−NLL(forget)) + alpha·NLL(retain) + hinge_weight·H,
H = ``reference``: mean relu(m − (z_θ0[y] − z_θ[y])) (the paper's abstract: the forget example's
    logits differ from the original model's by at least the margin), or
    ``alternatives``: mean relu(m + z_θ[y] − max_{v≠y} z_θ[v]) (the answer a margin below the
    best other token), over the scored forget tokens y (mansu.unlearn.losses).

Only the abstract of the paper was available to this project: it sets the margin to "half the
quantization step" without a number in logit units. So ``margin: null`` measures it here, once,
before training: m = the root-mean-square change NF4 (the quantizer's blocksize and skip_modules,
bitsandbytes-exact) makes to θ0's answer-token logits on the forget corpus — the quantization
error in logit space. A number sets it directly. The measured value is in the record
(``metrics.unlearning.margin``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch.nn import functional as F

from baselines.qat_nf4 import QuantizedForward, quantized_weight_names
from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import split_batches
from mansu.unlearn.checks import UnlearnResult, check_common_knobs, require
from mansu.unlearn.likelihood import forward_logits, mean_nll
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.losses import alternative_margin_hinge, ga_loss, logit_drop_hinge
from mansu.unlearn.optimizers import StorageAdamW, trainable_parameters
from mansu.unlearn.reference import frozen_copy


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            hinge: Literal["reference", "alternatives"] = "reference",
            margin: float | None = None, hinge_weight: float = 1.0, ga_weight: float = 1.0,
            alpha: float = 1.0, lr: float = 1e-5, max_steps: int = 100, batch_size: int = 4,
            weight_decay: float = 0.01, max_length: int = 512,
            loss_tokens: Literal["answer", "all"] = "answer", train_embeddings: bool = True,
            blocksize: int = 64, skip_modules: tuple[str, ...] = ("lm_head",),
            stop_forget_acc: float | None = None, eval_every: int = 10) -> UnlearnResult:
    check_common_knobs("margin", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=stop_forget_acc, eval_every=eval_every)
    require(hinge in ("reference", "alternatives"),
            f"margin: hinge must be 'reference' or 'alternatives', got {hinge!r}")
    require(margin is None or margin > 0, f"margin: margin must be > 0 or null, got {margin}")
    for name, value in (("hinge_weight", hinge_weight), ("ga_weight", ga_weight),
                        ("alpha", alpha)):
        require(value >= 0, f"margin: {name} must be >= 0, got {value}")
    require(alpha == 0 or len(retain.corpus) > 0,
            "margin: alpha > 0 needs a retain corpus, and it is empty")
    reference = frozen_copy(model)
    batching = {"batch_size": batch_size, "device": ctx.device, "max_length": max_length,
                "loss_tokens": loss_tokens}
    if margin is None:
        margin = quantization_logit_error(
            reference, split_batches(tokenizer, forget, seed=ctx.seed, **batching),
            count=-(-len(forget.corpus) // batch_size), blocksize=blocksize,
            skip_modules=skip_modules)
        require(margin > 0, "margin: NF4 leaves θ0's forget logits unchanged, so the measured "
                            "margin is 0; set method.margin to a number")
    params = [p for _, p in trainable_parameters(model, train_embeddings=train_embeddings)]
    optimizer = StorageAdamW(params, ctx.storage, lr=lr, weight_decay=weight_decay)
    forget_batches = split_batches(tokenizer, forget, seed=ctx.seed, **batching)
    retain_batches = (split_batches(tokenizer, retain, seed=ctx.seed + 1, **batching)
                      if alpha > 0 else None)

    def closure():
        batch = next(forget_batches)
        logits = forward_logits(model, batch)
        if hinge == "reference":
            with torch.no_grad():
                ref_logits = forward_logits(reference, batch)
            hinge_term = logit_drop_hinge(logits, ref_logits, batch["labels"], margin)
        else:
            hinge_term = alternative_margin_hinge(logits, batch["labels"], margin)
        loss = hinge_weight * hinge_term
        if ga_weight > 0:
            loss = loss + ga_weight * ga_loss(_mean_nll_of_logits(logits, batch["labels"]))
        if retain_batches is not None:
            loss = loss + alpha * mean_nll(model, next(retain_batches))
        optimizer.backward(loss)
        return loss.detach()

    return run_unlearning(model, tokenizer, forget, ctx, optimizer, closure, max_steps=max_steps,
                          stop_forget_acc=stop_forget_acc, eval_every=eval_every,
                          info={"margin": margin, "hinge": hinge, "loss_tokens": loss_tokens})


def _mean_nll_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mansu.unlearn.likelihood.mean_nll from logits already computed (one forward serves GA and hinge)."""
    targets = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100)


@torch.no_grad()
def quantization_logit_error(model, batches: Iterator[dict], *, count: int, blocksize: int,
                             skip_modules: tuple[str, ...]) -> float:
    """RMS over the scored tokens of `count` batches of z_Q(θ)[y] − z_θ[y]: how far NF4 moves
    the answers' logits of `model` (which is left unchanged)."""
    quantized = QuantizedForward(model, quantized_weight_names(model, skip_modules), blocksize)
    total, tokens = 0.0, 0
    for _ in range(count):
        batch = next(batches)
        scored = batch["labels"][:, 1:] != -100
        targets = batch["labels"][:, 1:].clamp_min(0).unsqueeze(-1)
        exact = forward_logits(model, batch)[:, :-1].float().gather(-1, targets).squeeze(-1)
        rounded = forward_logits(quantized, batch)[:, :-1].float().gather(-1, targets).squeeze(-1)
        total += float(((rounded - exact) ** 2 * scored).sum())
        tokens += int(scored.sum())
    return (total / max(tokens, 1)) ** 0.5
