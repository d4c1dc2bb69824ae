"""Gradient ascent (GA): minimise −NLL(forget) over every trainable parameter (embeddings too,
unless train_embeddings=false). Reference: the TOFU/NPO code's ``grad_ascent`` (AdamW, lr 1e-5,
weight decay 0.01), at a constant learning rate and counted in steps."""

from __future__ import annotations

from mansu.unlearn.checks import UnlearnResult
from mansu.unlearn.likelihood import mean_nll
from mansu.unlearn.losses import ga_loss
from mansu.unlearn.scaffold import Training, baseline


@baseline("ga")
def unlearn(training: Training) -> UnlearnResult:
    return training.train(lambda forget, retain: ga_loss(mean_nll(training.model, forget)))
