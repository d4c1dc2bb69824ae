"""What every unlearning method checks before it changes a parameter, and the result it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mansu.data import Split


@dataclass
class UnlearnResult:
    """The unlearned model plus what the method wants recorded (``info`` is JSON-ready)."""

    model: nn.Module
    steps: int
    losses: list[float]
    info: dict = field(default_factory=dict)


class UnlearningDiverged(RuntimeError):
    """A loss or a trained parameter became NaN/inf; the message names the step and the value."""

    status = "diverged"  # what the run's record says instead of "failed"


def require(condition: bool, message: str) -> None:
    """Reject an impossible setting before any training, with one clear message."""
    if not condition:
        raise ValueError(message)


def check_common_knobs(method: str, forget: Split, *, lr: float, max_steps: int, batch_size: int,
                       stop_forget_acc: float | None, eval_every: int) -> None:
    """The checks every training method needs, run before any parameter changes."""
    require(len(forget.corpus) > 0, f"{method}: the forget corpus is empty; nothing to unlearn")
    require(lr > 0, f"{method}: lr must be > 0, got {lr}")
    require(max_steps >= 1, f"{method}: max_steps must be >= 1, got {max_steps}")
    require(batch_size >= 1, f"{method}: batch_size must be >= 1, got {batch_size}")
    if stop_forget_acc is not None:
        require(0.0 <= stop_forget_acc <= 1.0,
                f"{method}: stop_forget_acc must be in [0, 1], got {stop_forget_acc}")
        require(eval_every >= 1, f"{method}: eval_every must be >= 1, got {eval_every}")
        require(len(forget.questions) > 0,
                f"{method}: stop_forget_acc needs forget questions to evaluate, and there are none")


