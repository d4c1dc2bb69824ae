"""The magnitude floor (docs/method.md §4.5): a moved weight goes onto the NF4 grid value of the next
code in its update's direction (further if training already passed it), so that it is a fixed
point of Q and its code differs from Q(θ0)'s: quantization cannot round the update away.

Which moved weights are floored is ``floor_mode`` (``mansu.unlearn.mansu.budget`` orders and cuts
them against the retain budget):
- ``knapsack`` (default): the ones whose first-order forget gain g_f·δ is largest for their
  predicted retain cost, within the budget (see budget.py);
- ``next_code`` (docs/method.md): every moved weight (measured: collapses retain on the tiny model);
- ``stochastic``: each with probability |Δ|/|δ|, so the floored update equals the trained one in
  expectation.
Every moved weight not floored goes back to θ0, so θu holds only fixed points of Q. So does a
moved weight that cannot be floored: a block absmax (its move would rescale the block), or one
already in the grid's last code in its update's direction.

The floor is computed in the stored dtype: a bf16 weight is set to the bf16 value nearest
code × absmax that still quantizes to that code (bf16 rounding, relative 2^-9, never crosses an
NF4 boundary: each nonzero code value is >= 10% of itself from both its midpoints; 0 is exact).
The certificate (certificate.py) checks it rather than assumes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mansu.quantize.quantizer import NF4_CODE, NF4_MIDPOINTS, expand_blocks, normalized_blocks
from mansu.unlearn.mansu.mask import MaskedWeight

FLOOR_MODES = ("knapsack", "next_code", "stochastic")
_TOP_CODE = len(NF4_CODE) - 1


@dataclass
class FloorResult:
    """``values``: the floored entries (dtype of the updated ones); ``floored``: moved onto the
    next code in the update's direction; ``restored``: moved, but put back to θ0."""

    values: Tensor
    floored: Tensor
    restored: Tensor


def floor_targets(theta0: Tensor, updated: Tensor, scale: Tensor, code0: Tensor,
                  absmax_holder: Tensor) -> tuple[Tensor, Tensor]:
    """(grid value of the nearest code at or beyond where the update left each entry, at least
    one code past θ0's, in the update's direction; whether the entry can be floored there: it
    moved, has a code in that direction and does not hold its block's absmax)."""
    code = NF4_CODE.to(scale.device)
    delta = updated.float() - theta0.float()
    up = delta > 0
    position = updated.float() / scale.clamp_min(torch.finfo(torch.float32).tiny)
    j0 = code0.long()
    first_at_or_above = torch.searchsorted(code, position).clamp(max=_TOP_CODE)
    last_at_or_below = (torch.searchsorted(code, position, right=True) - 1).clamp(min=0)
    target = torch.where(up, torch.maximum(j0 + 1, first_at_or_above),
                         torch.minimum(j0 - 1, last_at_or_below)).clamp(0, _TOP_CODE)
    reachable = torch.where(up, j0 < _TOP_CODE, j0 > 0)
    floorable = (delta != 0) & reachable & ~absmax_holder
    return grid_value(target, scale, updated.dtype), floorable


def floor_entries(theta0: Tensor, updated: Tensor, scale: Tensor, code0: Tensor,
                  absmax_holder: Tensor, generator: torch.Generator | None = None,
                  chosen: Tensor | None = None) -> FloorResult:
    """The floor on flat entries: every floorable entry (``chosen`` ones only, when given) goes
    to its grid target; every other moved entry goes back to θ0. With a ``generator``
    (``floor_mode: stochastic``) an entry is floored only with probability |Δ| / |target − θ0|."""
    grid, floored = floor_targets(theta0, updated, scale, code0, absmax_holder)
    delta = updated.float() - theta0.float()
    if chosen is not None:
        floored &= chosen
    if generator is not None:
        keep = delta.abs() / (grid.float() - theta0.float()).abs().clamp_min(delta.abs())
        draw = torch.rand(keep.shape, generator=generator, device=generator.device)
        floored &= draw.to(keep.device) < keep
    restored = (delta != 0) & ~floored
    values = torch.where(restored, theta0.to(updated.dtype), updated)
    values = torch.where(floored, grid, values)
    return FloorResult(values, floored, restored)


def grid_value(target: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``dtype`` value nearest NF4_CODE[target] × scale (computed in float32, as bitsandbytes
    dequantizes) that bitsandbytes' rounding still maps to ``target`` at this scale: the rounded
    value, or its neighbour on the other side of the exact one if rounding crossed a boundary."""
    exact = NF4_CODE.to(scale.device)[target] * scale
    nearest = exact.to(dtype)
    toward_exact = torch.where(nearest.float() > exact, float("-inf"), float("inf")).to(dtype)
    other = torch.nextafter(nearest, toward_exact)
    return torch.where(_code_at(nearest, scale) == target, nearest, other)


def _code_at(values: Tensor, scale: Tensor) -> Tensor:
    x = torch.clamp(values.float() * (1.0 / scale), -1, 1)
    return torch.bucketize(x, NF4_MIDPOINTS.to(x.device))


def magnitude_floor(theta0: Tensor, updated: Tensor, mask: Tensor, blocksize: int = 64, *,
                    generator: torch.Generator | None = None) -> FloorResult:
    """The floor on a whole weight tensor: ``mask`` (its shape) says which entries may be floored;
    every block-absmax element of θ0 (ties included) is protected even inside the mask. Entries
    outside the mask keep their updated value. ``floored`` / ``restored`` are flat."""
    x, absmax = normalized_blocks(theta0, blocksize)
    scale = expand_blocks(absmax, x.numel(), blocksize)
    flat0, flat = theta0.reshape(-1), updated.reshape(-1)
    entries = mask.reshape(-1).nonzero()[:, 0]
    codes = torch.bucketize(x, NF4_MIDPOINTS.to(x.device))
    holders = flat0.float().abs() == scale
    inner = floor_entries(flat0[entries], flat[entries], scale[entries], codes[entries],
                          holders[entries], generator)
    values = flat.clone()
    values[entries] = inner.values
    floored = torch.zeros_like(flat, dtype=torch.bool)
    restored = torch.zeros_like(floored)
    floored[entries], restored[entries] = inner.floored, inner.restored
    return FloorResult(values.view_as(updated), floored, restored)


def masked_targets(masked: list[MaskedWeight]) -> tuple[Tensor, Tensor]:
    """``floor_targets`` over every masked entry (flat, mask order; absmax holders are never in
    the mask): (target values as float32, floorable)."""
    parts = [floor_targets(m.theta0, m.current(), m.scale, m.code0,
                           torch.zeros_like(m.index, dtype=torch.bool)) for m in masked]
    return (torch.cat([grid.float() for grid, _ in parts]),
            torch.cat([floorable for _, floorable in parts]))


def stochastic_choice(theta0: Tensor, trained: Tensor, targets: Tensor, floorable: Tensor,
                      generator: torch.Generator) -> Tensor:
    """``floor_mode: stochastic``: floor with probability |Δ| / |target − θ0|."""
    delta = (trained - theta0).abs()
    keep = delta / (targets - theta0).abs().clamp_min(torch.finfo(torch.float32).tiny)
    draw = torch.rand(keep.shape, generator=generator, device=generator.device).to(keep.device)
    return floorable & (draw < keep)


def apply_floor(masked: list[MaskedWeight], chosen: Tensor) -> dict:
    """Floor the ``chosen`` masked entries (flat bool, mask order) onto their targets and put
    every other moved entry back to θ0, in place; ``index_floored`` records the floored ones."""
    floored = restored = 0
    for m, part in zip(masked, chosen.split([m.index.numel() for m in masked])):
        result = floor_entries(m.theta0, m.current(), m.scale, m.code0,
                               torch.zeros_like(m.index, dtype=torch.bool), chosen=part)
        m.write(result.values)
        m.index_floored = result.floored
        floored += int(result.floored.sum())
        restored += int(result.restored.sum())
    return {"floored": floored, "restored": restored}
