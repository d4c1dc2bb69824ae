"""No unlearning: θu = θ0, the control every sweep should include (the PTQ gap of an unchanged
model is quantization noise alone)."""

from __future__ import annotations

from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.checks import UnlearnResult


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext) -> UnlearnResult:
    return UnlearnResult(model=model, steps=0, losses=[], info={"storage": ctx.storage})
