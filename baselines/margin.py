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
from mansu.unlearn.checks import UnlearnResult, require
from mansu.unlearn.likelihood import forward_logits, mean_nll
from mansu.unlearn.losses import alternative_margin_hinge, ga_loss, logit_drop_hinge
from mansu.unlearn.reference import frozen_copy
from mansu.unlearn.scaffold import Training, baseline


@baseline("margin")
def unlearn(training: Training, *, hinge: Literal["reference", "alternatives"] = "reference",
            margin: float | None = None, hinge_weight: float = 1.0, ga_weight: float = 1.0,
            alpha: float = 1.0, blocksize: int = 64,
            skip_modules: tuple[str, ...] = ("lm_head",)) -> UnlearnResult:
    require(hinge in ("reference", "alternatives"),
            f"margin: hinge must be 'reference' or 'alternatives', got {hinge!r}")
    require(margin is None or margin > 0, f"margin: margin must be > 0 or null, got {margin}")
    for name, value in (("hinge_weight", hinge_weight), ("ga_weight", ga_weight),
                        ("alpha", alpha)):
        require(value >= 0, f"margin: {name} must be >= 0, got {value}")
    require(alpha == 0 or len(training.retain.corpus) > 0,
            "margin: alpha > 0 needs a retain corpus, and it is empty")
    model = training.model
    reference = frozen_copy(model)
    if margin is None:
        margin = quantization_logit_error(
            reference, training.forget_batches(),
            count=-(-len(training.forget.corpus) // training.knobs.batch_size),
            blocksize=blocksize, skip_modules=skip_modules)
        require(margin > 0, "margin: NF4 leaves θ0's forget logits unchanged, so the measured "
                            "margin is 0; set method.margin to a number")

    def loss(batch, retain):
        logits = forward_logits(model, batch)
        if hinge == "reference":
            with torch.no_grad():
                ref_logits = forward_logits(reference, batch)
            hinge_term = logit_drop_hinge(logits, ref_logits, batch["labels"], margin)
        else:
            hinge_term = alternative_margin_hinge(logits, batch["labels"], margin)
        value = hinge_weight * hinge_term
        if ga_weight > 0:
            value = value + ga_weight * ga_loss(_mean_nll_of_logits(logits, batch["labels"]))
        if retain is not None:
            value = value + alpha * mean_nll(model, retain)
        return value

    return training.train(loss, retain=alpha > 0, info={"margin": margin, "hinge": hinge})


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
