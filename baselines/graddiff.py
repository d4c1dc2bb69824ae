"""Gradient difference: minimise −NLL(forget) + α·R(retain), R = NLL(retain) (``nll``) or
KL(π_ref ‖ π_θ) against a frozen copy of θ0 (``kl``), over every trainable parameter.
Reference: the TOFU/NPO code's ``grad_diff`` and ``KL`` losses (α = 1, AdamW, lr 1e-5)."""

from __future__ import annotations

from typing import Literal

from mansu.unlearn.checks import UnlearnResult, require
from mansu.unlearn.likelihood import mean_nll, retain_term
from mansu.unlearn.losses import graddiff_loss
from mansu.unlearn.reference import frozen_copy
from mansu.unlearn.scaffold import Training, baseline


@baseline("graddiff")
def unlearn(training: Training, *, retain_loss: Literal["nll", "kl"] = "nll",
            alpha: float = 1.0) -> UnlearnResult:
    require(retain_loss in ("nll", "kl"),
            f"graddiff: retain_loss must be 'nll' or 'kl', got {retain_loss!r}")
    require(alpha >= 0, f"graddiff: alpha must be >= 0, got {alpha}")
    require(len(training.retain.corpus) > 0, "graddiff: the retain corpus is empty")
    model = training.model
    reference = frozen_copy(model) if retain_loss == "kl" else None

    def loss(forget, retain):
        return graddiff_loss(mean_nll(model, forget),
                             retain_term(retain_loss, model, retain, reference), alpha)

    return training.train(loss, retain=True)
