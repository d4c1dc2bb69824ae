"""Circuit Attribution Divergence (docs/method.md §5): does θ0's circuit still compute the forget signal?

θ0, θu (and Q(θu)) are attributed on the same items, counterfactuals and metric
(``mansu.attribution.items.attribute_items``), and compared on the circuit C selected on θ0. Variants,
each 0 when nothing changed and 1 when the circuit's signal is gone:
- ``projection`` (the original CAD): 1 - clip(<a'_C, a_C> / ||a_C||², 0, 1) on EAP-IG scores. A
  score is activation difference × ∂M/∂z, and ∂M/∂z runs through everything after the circuit, so
  anything downstream that lowers M lowers it too: it falls with β whatever the cause
  (scripts/cad_controls.py shows it calling downstream suppression erasure).
- ``cosine``: 1 - clip(cos(a'_C, a_C), 0, 1), the scale-free comparison of the same scores.
- ``js``: Jensen-Shannon divergence (bits) of |a| / ||a||_1 and |a'| / ||a'||_1 over all nodes.
- ``activation``: the projection on the circuit units' activation differences z(x) - z(x~)
  (summed over positions, averaged over items), no gradient in it.
- ``write``: the same on what each circuit node writes to the residual stream, W_out,v (z_v(x) -
  z_v(x~)), so that an edit of a node's own output weights counts as well. Both are taken at the
  positions where M reads the answer. Averaged over items they keep the shared question-vs-
  neutral difference and lose each fact's own direction: the erasure control barely moves them.
- ``direct``: the projection on each circuit node's direct effect on M, its write read by θ0's
  unembedding (final-norm gain folded in) on each item's own answer tokens
  (``ItemAttribution.direct``): fact-specific, and blind to anything downstream of the circuit
  (bit-identical circuit activations give exactly 0).
- ``frozen``: the projection on EAP-IG scores computed with θ0's gradient at the circuit's layer
  outputs in place of θu's (``item_attribution.write_gradients``): the circuit's total (direct and
  indirect) first-order effect read by θ0's downstream. On θ0 it is ``projection``.
``DEFINITION`` (``direct``) is the one whose erasure − suppression margin the controls put highest
(scripts/cad_controls.py, docs/results/cad_controls.md); the record names it (``cad.definition``)
and its value minus its floor decides the ``structural_erasure`` verdict.

β = mean M'(x) / mean M(x) on the same items. The noise floor of each variant is the variant
between two disjoint random halves of the forget items on θ0 (both directions averaged), over many
random splits: its mean, with a 95% interval over splits. The halves are means of per-item numbers
computed once, so the floor costs no model pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mansu.attribution.circuit import Circuit
from mansu.attribution.eap_ig import Attribution
from mansu.attribution.items import ItemAttribution, circuit_units, output_projections
from mansu.attribution.nodes import HEADS, NEURONS

VARIANTS = ("projection", "cosine", "js", "activation", "write", "direct", "frozen")
SCORE_VARIANTS = ("projection", "cosine", "js")  # need θu's EAP-IG scores (``eval.cad_scores``)
DEFINITION = "direct"  # the one variant the controls order right (scripts/cad_controls.py)


def _flat(scores: Attribution | Tensor) -> Tensor:
    return (scores.flat() if isinstance(scores, Attribution) else scores).double()


def _mask(circuit: Circuit | Tensor) -> Tensor:
    return circuit.flat() if isinstance(circuit, Circuit) else circuit


def projection_divergence(reference: Tensor, other: Tensor) -> float:
    """1 - clip(<other, reference> / ||reference||², 0, 1)."""
    reference, other = reference.double().flatten(), other.double().flatten()
    norm = float(reference @ reference)
    if norm == 0.0:
        raise ValueError("CAD is undefined: the circuit's θ0 signal is zero")
    return 1.0 - min(max(float(other @ reference) / norm, 0.0), 1.0)


def cad(a0: Attribution | Tensor, a1: Attribution | Tensor, circuit: Circuit | Tensor) -> float:
    """1 - clip(<a1_C, a0_C> / ||a0_C||^2, 0, 1); tensors are flat node vectors and a bool mask."""
    selected = _mask(circuit)
    return projection_divergence(_flat(a0)[selected], _flat(a1)[selected])


def cad_cosine(a0: Attribution | Tensor, a1: Attribution | Tensor, circuit: Circuit | Tensor) -> float:
    """1 - clip(cos(a1_C, a0_C), 0, 1): the scores' direction on the circuit, not their scale."""
    selected = _mask(circuit)
    reference, other = _flat(a0)[selected], _flat(a1)[selected]
    norms = float(reference.norm() * other.norm())
    if norms == 0.0:
        raise ValueError("the cosine CAD is undefined for an all-zero circuit attribution")
    return 1.0 - min(max(float(other @ reference) / norms, 0.0), 1.0)


def cad_js(a0: Attribution | Tensor, a1: Attribution | Tensor) -> float:
    """Jensen-Shannon divergence (base 2) of the normalized absolute attributions."""
    p, q = _flat(a0).abs(), _flat(a1).abs()
    if p.sum() == 0 or q.sum() == 0:
        raise ValueError("CAD_JS is undefined for an all-zero attribution")
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2

    def kl(x: Tensor) -> float:
        support = x > 0
        return float((x[support] * (x[support] / mid[support]).log2()).sum())

    return (kl(p) + kl(q)) / 2


def behaviour_ratio(m0: Attribution | Tensor | float, m1: Attribution | Tensor | float) -> float:
    """β = mean M'(x) / mean M(x) (Attributions give their clean metric per item)."""
    mean0, mean1 = (float(torch.as_tensor(m.metric_clean if isinstance(m, Attribution) else m,
                                          dtype=torch.float64).mean()) for m in (m0, m1))
    if mean0 == 0.0:
        raise ValueError("β is undefined: θ0's metric averages exactly 0 on these items")
    return mean1 / mean0


# ---------------------------------------------------------------------------------------------
# What the circuit computes, per model


def output_weights(model: nn.Module, circuit: Circuit) -> dict:
    """(kind, layer) -> float32 [d_model, width] output projection (CPU) of every layer that holds a
    circuit node (dequantized for a bitsandbytes model), keyed like the activation diffs."""
    held = {(kind, layer) for kind, nodes in ((HEADS, circuit.heads), (NEURONS, circuit.neurons))
            for layer in range(nodes.shape[0]) if nodes[layer].any()}
    return {key: weight.cpu() for key, weight in output_projections(model, held).items()}


class Profile:
    """Item-averaged signals of one model (over ``subset`` of the items, default all): EAP-IG
    scores of every node, the circuit units' activation differences, and what each circuit node
    writes to the residual stream with ``weights`` (``output_weights`` of that model)."""

    def __init__(self, items: ItemAttribution, circuit: Circuit, weights: dict,
                 subset: Sequence[int] | Tensor | None = None):
        index = slice(None) if subset is None else torch.as_tensor(subset)
        self.scores = items.scores[index].double().mean(0)
        self.direct = items.direct[index].double().mean(0)
        self.frozen = items.frozen[index].double().mean(0)
        keep = circuit_units(circuit, {key: w[:1] for key, w in weights.items()})
        activations, writes = [], []
        for key in sorted(weights):
            units = keep[key]
            diff = items.diffs[key][index].double().mean(0)
            if diff.numel() == units.numel():  # full width: cut to the circuit's units
                diff = diff[units]
            node_width = (units.numel() // circuit.heads.shape[1] if key[0] == HEADS
                          else circuit.neuron_block)
            nodes = torch.unique(units.nonzero()[:, 0].div(node_width, rounding_mode="floor"),
                                 return_inverse=True)[1]
            per_unit = weights[key][:, units].double() * diff  # [d_model, kept units]
            node_writes = torch.zeros(per_unit.shape[0], int(nodes.max()) + 1, dtype=torch.float64)
            writes.append(node_writes.index_add_(1, nodes, per_unit).T.flatten())
            activations.append(diff)
        self.activation = torch.cat(activations)
        self.write = torch.cat(writes)


def divergences(reference: Profile, other: Profile, circuit: Circuit,
                scores: bool = True) -> dict[str, float]:
    """Every variant of ``other`` against ``reference`` (without ``SCORE_VARIANTS`` when not
    ``scores``)."""
    values = {"activation": projection_divergence(reference.activation, other.activation),
              "write": projection_divergence(reference.write, other.write),
              "direct": cad(reference.direct, other.direct, circuit),
              "frozen": cad(reference.frozen, other.frozen, circuit)}
    if scores:
        values |= {"projection": cad(reference.scores, other.scores, circuit),
                   "cosine": cad_cosine(reference.scores, other.scores, circuit),
                   "js": cad_js(reference.scores, other.scores)}
    return values


def noise_floors(items: ItemAttribution, circuit: Circuit, weights: dict, *, splits: int = 200,
                 seed: int = 0) -> dict:
    """Each variant between two disjoint random halves of θ0's items, both directions averaged,
    over ``splits`` random half-splits: mean and 95% interval over splits."""
    n = items.n_items
    if n < 2:
        raise ValueError(f"the noise floor splits the forget items into two halves; it needs at "
                         f"least 2 items, got {n}")
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(splits):
        order = torch.randperm(n, generator=generator)
        first, second = (Profile(items, circuit, weights, part)
                         for part in (order[: n // 2], order[n // 2: 2 * (n // 2)]))
        there, back = divergences(first, second, circuit), divergences(second, first, circuit)
        for name in VARIANTS:
            values[name].append((there[name] + back[name]) / 2)
    floors = {}
    for name, sample in values.items():
        low, high = np.percentile(sample, [2.5, 97.5])
        floors[name] = {"value": float(np.mean(sample)), "ci_low": float(low),
                        "ci_high": float(high)}
    return {"items_per_half": n // 2, "splits": splits, "variants": floors}


def cad_report(theta0: ItemAttribution, thetau: ItemAttribution, circuit: Circuit, *,
               weights0: dict, weightsu: dict, floors: dict, thetaq: ItemAttribution | None = None,
               weightsq: dict | None = None, definition: str = DEFINITION) -> dict:
    """JSON-ready numbers for θu (and Q(θu) when ``thetaq`` is given): every variant with its own
    floor, and at the top level the ``definition`` that the verdict reads. Attributions taken
    without EAP-IG scores (``has_scores`` False) leave the ``SCORE_VARIANTS`` out (None)."""
    scores = thetau.has_scores and (thetaq is None or thetaq.has_scores)
    if definition not in VARIANTS or (definition in SCORE_VARIANTS and not scores):
        raise ValueError(f"unknown CAD definition {definition!r}; expected one of "
                         f"{VARIANTS if scores else tuple(v for v in VARIANTS if v not in SCORE_VARIANTS)}")
    reference = Profile(theta0, circuit, weights0)
    models = {"": (thetau, weightsu)} | ({"_q": (thetaq, weightsq)} if thetaq is not None else {})
    variants = {name: {"floor": floors["variants"][name]["value"],
                       "floor_ci": [floors["variants"][name]["ci_low"],
                                    floors["variants"][name]["ci_high"]]}
                for name in VARIANTS}
    report = {"definition": definition, "floor_items_per_half": floors["items_per_half"],
              "floor_splits": floors["splits"], "circuit_size": circuit.size,
              "circuit_faithfulness": circuit.faithfulness}
    for suffix, (items, weights) in models.items():
        values = divergences(reference, Profile(items, circuit, weights), circuit, scores)
        for name, value in values.items():
            variants[name]["value" + suffix] = value
            variants[name]["minus_floor" + suffix] = value - variants[name]["floor"]
        report["cad" + suffix] = values[definition]
        report["cad" + suffix + "_minus_floor"] = values[definition] - variants[definition]["floor"]
        report["cad_projection" + suffix] = values.get("projection")
        report["cad_js" + suffix] = values.get("js")
        report["beta" + suffix] = behaviour_ratio(theta0.attribution, items.attribution)
    report["noise_floor"] = variants[definition]["floor"]
    report["variants"] = variants
    return report
