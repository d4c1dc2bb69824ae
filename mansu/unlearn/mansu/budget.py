"""The retain budget on the *final* update (docs/method.md §4.3, as changed by measurement).

docs/method.md applies ½ Σ F_i τ_i² to the floor before training, with F from per-text mean-token
gradients on the texts that also build the null space: measured on the tiny model it predicted
1e-5..4e-5 nats where +3.7 were measured, so it never bound. Here the budget acts after training,
on what will actually be written (the floored displacement δ_i = target_i − θ0_i, or the trained
Δ_i without a floor):

1. an order over the candidate entries: ``floor_mode: knapsack`` ranks them by forget gain per
   retain cost, gain_i = g_f,i δ_i (first-order increase of the forget NLL; g_f at θ0 on the
   forget answers) and cost_i = ½ F_i δ_i² (retain.RetainCost.curvature; the first-order term
   ḡ_i δ_i is recorded, not ranked on: on a few dozen texts it is mostly noise), entries without
   gain left out; the other modes rank by cost, cheapest first
   ("drop the costliest floored entries until it fits");
2. the longest prefix of that order that fits ``retain_budget`` (nats per retain token):
   ``budget: diagonal`` by the summed predicted cost; ``budget: measured`` (default) by the
   retain loss itself, evaluated on the Fisher texts with the prefix written in (a bisection
   over the prefix length), since along θ0 + sΔ the loss is not quadratic (measured: flat to
   s = 0.3, +1.6 nats at s = 0.6); ``budget: none`` keeps every candidate.
The record carries the diagonal prediction, the Fisher-text measurement and the held-out change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mansu.unlearn.checks import require

BUDGETS = ("measured", "diagonal", "none")


def candidate_order(candidates: Tensor, cost: Tensor, gain: Tensor | None) -> Tensor:
    """Flat indices of the candidates in the order the budget takes them: by gain per cost
    (``gain`` given; cost ≤ 0 first; gain ≤ 0 left out), else by cost, cheapest first."""
    index = candidates.nonzero()[:, 0]
    if gain is None:
        return index[cost[index].argsort(stable=True)]
    index = index[gain[index] > 0]
    c, g = cost[index].double(), gain[index].double()
    priority = torch.where(c > 0, g / c.clamp_min(1e-300), torch.inf)
    # Among free entries (cost ≤ 0), the largest gain first.
    tie = torch.where(c > 0, 0.0, g)
    order = torch.argsort(tie, descending=True, stable=True)
    order = order[torch.argsort(priority[order], descending=True, stable=True)]
    return index[order]


def diagonal_prefix(order: Tensor, cost: Tensor, budget: float) -> int:
    """The longest prefix of ``order`` whose summed predicted cost stays within ``budget``."""
    if order.numel() == 0:
        return 0
    within = (cost[order].double().cumsum(0) <= budget).nonzero()
    return int(within[-1]) + 1 if within.numel() else 0


def measured_prefix(order: Tensor, loss_change: Callable[[Tensor], float], budget: float,
                    max_evaluations: int = 16) -> tuple[int, list[list[float]]]:
    """The longest prefix of ``order`` whose *measured* loss change fits ``budget``, by
    bisection (the change grows with the prefix, up to noise); ``loss_change(indices)`` writes
    those entries and returns the change. Also the (prefix, change) pairs evaluated."""
    trace: list[list[float]] = []

    def fits(k: int) -> bool:
        change = loss_change(order[:k])
        trace.append([k, change])
        return change <= budget

    n = order.numel()
    if n == 0:
        return 0, trace
    if fits(n):
        return n, trace
    low, high = 0, n  # fits(low) holds (no change), fits(high) does not
    for _ in range(max_evaluations - 1):
        if high - low <= max(1, n // 1000):
            break
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low, trace


def check_budget(budget: str, retain_budget: float) -> None:
    require(budget in BUDGETS, f"mansu: budget must be one of {BUDGETS}, got {budget!r}")
    require(retain_budget >= 0, f"mansu: retain_budget must be >= 0, got {retain_budget}")
