"""The update-versus-bin diagnostics of docs/method.md §2, on state dicts of quantized Linear weights.

All functions are pure: dicts of tensors in, JSON-ready numbers out (``None`` where a quantity is
undefined, e.g. a share over zero weights). Pass only the weights of the layers that get quantized,
e.g. ``{name: state[name] for name in dequantized_state(qmodel)}``. Tensors are processed one at a
time, so a 135M-parameter model needs memory for a few copies of its largest matrix, not of the
model. NF4 is assumed with a plain float32 absmax (no double quantization), as in docs/method.md.

Conventions:
- A weight is *moved* (= *updated*) when its stored value differs between θ0 and θu; Δ = θu − θ0 is
  taken from the stored tensors, so a bf16 step that rounded away does not count.
- NF4 bin j holds the normalised values x = w / absmax in (m[j-1], m[j]] (m the midpoints), so the
  boundary above is crossed when x moves strictly past it and the one below when x reaches it.
- The element that is its block's absmax (x = ±1) cannot flip its own code: moving outward it stays
  the absmax, moving inward it rescales its whole block while it stays the largest. Its bin width
  toward the update is therefore +inf, as is the width of a weight in code 0 or 15 moving outward.
  Such weights are counted (``bin_update_ratio_n_unbounded``) but left out of the ratio quantiles
  and of the flip calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mansu.quantize.quantizer import NF4_CODE, NF4_MIDPOINTS, expand_blocks, normalized_blocks

ZERO_CODE = 7  # index of 0.0 in NF4_CODE
_INF = torch.tensor([math.inf])
# Edges used to find crossings: no boundary lies beyond the extreme codes.
_OPEN_EDGES = torch.cat([-_INF, NF4_MIDPOINTS, _INF])
# Edges used to measure bins: normalised values live in [-1, 1].
_CLOSED_EDGES = torch.cat([-torch.ones(1), NF4_MIDPOINTS, torch.ones(1)])

# Flip calibration bins of |Δ|/W (W = width of the weight's own bin): half-decades from 1e-5 to 10,
# plus one bin below and one above.
_CALIBRATION_EDGES = [10.0 ** (k / 2) for k in range(-10, 3)]
_POSITION_BINS = 10


@dataclass(frozen=True)
class _NF4View:
    """How one flattened tensor sits in NF4; distances come out in float64."""

    x: Tensor  # w / block absmax as bitsandbytes computes it (float32)
    codes: Tensor  # NF4 code index, int64
    scale: Tensor  # the element's block absmax (float32)
    is_absmax: Tensor  # the element is (one of) its block's largest |w|

    @classmethod
    def of(cls, w: Tensor, blocksize: int) -> _NF4View:
        x, absmax = normalized_blocks(w, blocksize)
        scale = expand_blocks(absmax, x.numel(), blocksize)
        codes = torch.bucketize(x, NF4_MIDPOINTS)
        is_absmax = w.reshape(-1).float().abs() == scale
        return cls(x, codes, scale, is_absmax)

    def dequantized(self) -> Tensor:
        # The float32 product is the value bitsandbytes stores; widen only afterwards.
        return (NF4_CODE[self.codes] * self.scale).double()

    def distance_toward(self, direction: Tensor) -> Tensor:
        """Distance in w units from x to the boundary in ``direction`` (> 0 up, < 0 down)."""
        upper = _OPEN_EDGES.double()[self.codes + 1]
        lower = _OPEN_EDGES.double()[self.codes]
        x = self.x.double()
        distance = torch.where(direction > 0, upper - x, x - lower) * self.scale.double()
        return distance.masked_fill(self.is_absmax, math.inf)

    def bin_width(self) -> Tensor:
        lower, upper = self._closed_edges()
        return (upper - lower) * self.scale.double()

    def in_bin_position(self) -> Tensor:
        lower, upper = self._closed_edges()
        return (self.x.double() - lower) / (upper - lower)

    def _closed_edges(self) -> tuple[Tensor, Tensor]:
        edges = _CLOSED_EDGES.double()
        return edges[self.codes], edges[self.codes + 1]


def bin_width_toward(w: Tensor, delta: Tensor, blocksize: int = 64) -> Tensor:
    """Per element, the distance from w to its NF4 decision boundary in the direction of Δ.

    In units of w (normalised distance times the block absmax, the absmax held fixed), so the
    update crosses the boundary iff |Δ| exceeds it. +inf where no boundary can be crossed (module
    docstring: block absmax elements, extreme codes moving outward); NaN where Δ = 0.
    Returned as float64 with the shape of ``w``.
    """
    view = _NF4View.of(w.detach().cpu(), blocksize)
    direction = delta.detach().cpu().reshape(-1).double()
    distance = view.distance_toward(direction)
    return distance.masked_fill(direction == 0, math.nan).reshape(w.shape)


class _LogHistogram:
    """Quantiles of positive values without holding them: counts of log10 in 1000 bins a decade.

    Values are clamped into [1e-12, 1e12]; a quantile is read at the bin where the cumulative count
    reaches it (linear inside the bin), so it is exact to a factor 10**0.001 (0.23%).
    """

    LOW, HIGH, PER_DECADE = -12, 12, 1000

    def __init__(self) -> None:
        self.bins = (self.HIGH - self.LOW) * self.PER_DECADE
        self.counts = torch.zeros(self.bins, dtype=torch.float64)

    def add(self, values: Tensor) -> None:
        logs = values.double().clamp(10.0**self.LOW, 10.0**self.HIGH).log10()
        self.counts += torch.histc(logs, bins=self.bins, min=self.LOW, max=self.HIGH)

    def quantile(self, q: float) -> float | None:
        total = self.counts.sum().item()
        if total == 0:
            return None
        cumulative = self.counts.cumsum(0)
        target = q * total
        index = min(int(torch.searchsorted(cumulative, torch.tensor(target)).item()), self.bins - 1)
        before = cumulative[index].item() - self.counts[index].item()
        fraction = (target - before) / self.counts[index].item()
        return 10.0 ** (self.LOW + (index + fraction) / self.PER_DECADE)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def layer_type(name: str) -> str:
    """The module kind of a weight: "model.layers.3.self_attn.q_proj.weight" -> "q"."""
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return module.removesuffix("_proj")


def update_diagnostics(
    theta0: dict[str, Tensor], thetau: dict[str, Tensor], *, blocksize: int = 64
) -> dict:
    """docs/method.md §2 over the weights in ``theta0`` (θu must hold the same names and shapes).

    Keys: n_quantized_weights, n_moved, moved_share; bin_update_ratio_{median,p10,p90} over moved
    weights with a reachable boundary and bin_update_ratio_n_unbounded; code_flip_share_{all,moved};
    carried_share and carried_share_by_type; moved_abs_w_{p50,p90} (|θ0|) and moved_zero_bin_share;
    flip_calibration (bins of |Δ|/W with observed flip rate and the uniform-position prediction
    mean min(1, |Δ|/W)) and flip_calibration_slope (per-weight least squares through the origin of
    flipped ∈ {0,1} on the prediction); inbin_position_hist_{all,moved} (shares in 10 bins of the
    position of θ0's weights inside their NF4 bin, 0 = lower edge, 1 = upper edge).
    """
    n_weights = n_moved = flips_all = flips_moved = unbounded = moved_zero_bin = 0
    ratio_histogram, moved_abs_histogram = _LogHistogram(), _LogHistogram()
    carried = {"all": [0.0, 0.0]}  # layer type -> [<Q(θu)-Q(θ0), Δ>, <Δ, Δ>]
    n_edges = len(_CALIBRATION_EDGES)
    calibration_n = torch.zeros(n_edges + 1, dtype=torch.float64)
    calibration_flips = torch.zeros_like(calibration_n)
    calibration_predicted = torch.zeros_like(calibration_n)
    slope_terms = [0.0, 0.0]  # [sum flipped * predicted, sum predicted²]
    position_all = torch.zeros(_POSITION_BINS, dtype=torch.float64)
    position_moved = torch.zeros_like(position_all)

    for name, w0 in theta0.items():
        w0, wu = w0.detach().cpu(), thetau[name].detach().cpu()
        if wu.shape != w0.shape:
            raise ValueError(f"{name}: shape {tuple(wu.shape)} in θu but {tuple(w0.shape)} in θ0")
        before, after = _NF4View.of(w0, blocksize), _NF4View.of(wu, blocksize)
        delta = wu.reshape(-1).double() - w0.reshape(-1).double()
        moved = delta != 0
        flipped = before.codes != after.codes
        n_weights += delta.numel()
        n_moved += int(moved.sum())
        flips_all += int(flipped.sum())
        flips_moved += int((flipped & moved).sum())

        inner = float(((after.dequantized() - before.dequantized()) * delta).sum())
        norm = float((delta * delta).sum())
        for key in ("all", layer_type(name)):
            totals = carried.setdefault(key, [0.0, 0.0])
            totals[0] += inner
            totals[1] += norm

        position = before.in_bin_position()
        position_all += torch.histc(position, bins=_POSITION_BINS, min=0, max=1)
        position_moved += torch.histc(position[moved], bins=_POSITION_BINS, min=0, max=1)
        moved_abs_histogram.add(w0.reshape(-1)[moved].abs())
        moved_zero_bin += int((before.codes[moved] == ZERO_CODE).sum())

        step = delta[moved].abs()
        distance = before.distance_toward(delta)[moved]
        bounded = torch.isfinite(distance)
        unbounded += int((~bounded).sum())
        ratio_histogram.add(distance[bounded] / step[bounded])

        relative_step = step[bounded] / before.bin_width()[moved][bounded]
        predicted = relative_step.clamp(max=1.0)
        observed = flipped[moved][bounded].double()
        which = torch.bucketize(
            relative_step, torch.tensor(_CALIBRATION_EDGES, dtype=torch.float64)
        )
        calibration_n += torch.bincount(which, minlength=n_edges + 1)
        calibration_flips += torch.bincount(which, weights=observed, minlength=n_edges + 1)
        calibration_predicted += torch.bincount(which, weights=predicted, minlength=n_edges + 1)
        slope_terms[0] += float((observed * predicted).sum())
        slope_terms[1] += float((predicted * predicted).sum())

    bin_edges = [0.0, *_CALIBRATION_EDGES, None]
    calibration = [
        {
            "lo": bin_edges[i],
            "hi": bin_edges[i + 1],
            "n": int(count),
            "observed": float(calibration_flips[i] / count),
            "predicted": float(calibration_predicted[i] / count),
        }
        for i, count in enumerate(calibration_n.tolist())
        if count
    ]
    return {
        "n_quantized_weights": n_weights,
        "n_moved": n_moved,
        "moved_share": _ratio(n_moved, n_weights),
        "bin_update_ratio_median": ratio_histogram.quantile(0.5),
        "bin_update_ratio_p10": ratio_histogram.quantile(0.1),
        "bin_update_ratio_p90": ratio_histogram.quantile(0.9),
        "bin_update_ratio_n_unbounded": unbounded,
        "code_flip_share_all": _ratio(flips_all, n_weights),
        "code_flip_share_moved": _ratio(flips_moved, n_moved),
        "carried_share": _ratio(*carried.pop("all")),
        "carried_share_by_type": {key: _ratio(*totals) for key, totals in carried.items()},
        "moved_abs_w_p50": moved_abs_histogram.quantile(0.5),
        "moved_abs_w_p90": moved_abs_histogram.quantile(0.9),
        "moved_zero_bin_share": _ratio(moved_zero_bin, n_moved),
        "flip_calibration": calibration,
        "flip_calibration_slope": _ratio(*slope_terms),
        "inbin_position_hist_all": _shares(position_all),
        "inbin_position_hist_moved": _shares(position_moved),
    }


def _shares(counts: Tensor) -> list[float] | None:
    total = counts.sum().item()
    return (counts / total).tolist() if total else None


def noise_like_quantization(
    model_state: dict[str, Tensor], quantized_state: dict[str, Tensor], seed: int
) -> dict[str, Tensor]:
    """The noise control: θ plus Gaussian noise with each tensor's own quantization-error RMS.

    For every name in ``quantized_state`` (Q(θ) of the same θ, e.g. ``dequantized_state``) the noise
    is rescaled so that its realised RMS equals RMS(Q(θ) − θ) exactly; the result is cast back to
    the stored dtype (which rounds again for bf16). Other entries of ``model_state`` are passed
    through, so the result loads with ``load_state_dict``.
    """
    generator = torch.Generator().manual_seed(seed)
    noisy = dict(model_state)
    for name in sorted(quantized_state):
        weight = model_state[name].detach()
        error_rms = (quantized_state[name].double() - weight.double()).pow(2).mean().sqrt()
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        noise *= error_rms.cpu() / noise.pow(2).mean().sqrt()
        noisy[name] = (weight.double() + noise.to(weight.device)).to(weight.dtype)
    return noisy


def first_order_decomposition(
    grad: dict[str, Tensor],
    theta0: dict[str, Tensor],
    thetau: dict[str, Tensor],
    q0: dict[str, Tensor],
    qu: dict[str, Tensor],
) -> dict[str, float]:
    """First-order change of the forget loss under quantization, split by where it comes from.

    With g the forget-loss gradient at θu and Δ = θu − θ0, over the names in ``grad``:
    predicted = g·(Q(θu) − θu) = base_error + update_rounding, where base_error = g·(Q(θ0) − θ0)
    (what quantizing θ0 already did) and update_rounding = g·(Q(θu) − Q(θ0) − Δ) (how the
    quantizer treats the update), since Q(θu) − θu = (Q(θ0) − θ0) + (Q(θu) − Q(θ0) − Δ).
    Each term is summed on its own in float64.
    """
    totals = {"predicted": 0.0, "base_error": 0.0, "update_rounding": 0.0}
    for name, g in grad.items():
        g = g.double()
        w0, wu = theta0[name].double(), thetau[name].double()
        q_w0, q_wu = q0[name].double(), qu[name].double()
        totals["predicted"] += float((g * (q_wu - wu)).sum())
        totals["base_error"] += float((g * (q_w0 - w0)).sum())
        totals["update_rounding"] += float((g * (q_wu - q_w0 - (wu - w0))).sum())
    return totals
