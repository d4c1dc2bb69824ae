"""Circuit Attribution Divergence (METHOD.md §5): does θ0's circuit still carry the forget signal?

With node attributions a on θ0 and a' on θu (same items, counterfactual and metric; see
``mansu.eap_ig``) and the circuit C selected on θ0:
- CAD = 1 - clip(<a'_C, a_C> / ||a_C||^2, 0, 1): the share of the circuit's signal, projected on
  θ0's direction, that is gone. 0: the circuit computes what it did (any forgetting is suppression
  elsewhere); 1: it computes none of it.
- β = mean M'(x) / mean M(x), the behavioural ratio on the same items.
- the noise floor: CAD between the attributions of two disjoint halves of the forget set on θ0,
  i.e. how far CAD moves from item sampling alone (averaged over both directions, as CAD is not
  symmetric);
- CAD_JS: Jensen-Shannon divergence (bits, in [0, 1]) between |a| / ||a||_1 and |a'| / ||a'||_1
  over all nodes.
Every function takes attributions of any model ``attribute`` runs on, a bitsandbytes-quantized
Q(θu) included.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mansu.circuit import Circuit
from mansu.eap_ig import Attribution, attribute


def _flat(scores: Attribution | Tensor) -> Tensor:
    return (scores.flat() if isinstance(scores, Attribution) else scores).double()


def cad(a0: Attribution | Tensor, a1: Attribution | Tensor, circuit: Circuit | Tensor) -> float:
    """1 - clip(<a1_C, a0_C> / ||a0_C||^2, 0, 1); tensors are flat node vectors and a bool mask."""
    selected = circuit.flat() if isinstance(circuit, Circuit) else circuit
    reference, other = _flat(a0)[selected], _flat(a1)[selected]
    norm = float(reference @ reference)
    if norm == 0.0:
        raise ValueError("CAD is undefined: the circuit's θ0 attribution is zero")
    return 1.0 - min(max(float(other @ reference) / norm, 0.0), 1.0)


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


def noise_floor(model: nn.Module, tokenizer, forget: Sequence, circuit: Circuit | Tensor, *,
                seed: int = 0, **attribute_kwargs) -> float:
    """CAD between two disjoint random halves of ``forget`` attributed on the same model, averaged
    over both directions. ``attribute_kwargs`` must be the settings of the CAD it is compared to."""
    if len(forget) < 2:
        raise ValueError(f"the noise floor splits the forget set into two halves; it needs at least "
                         f"2 items, got {len(forget)}")
    order = list(range(len(forget)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    first, second = (attribute(model, tokenizer, [forget[i] for i in part], **attribute_kwargs)
                     for part in (order[:half], order[half:]))
    return (cad(first, second, circuit) + cad(second, first, circuit)) / 2


def cad_report(a0: Attribution, a_u: Attribution, circuit: Circuit, *,
               a_q: Attribution | None = None, floor: float | None = None) -> dict:
    """JSON-ready numbers for θu (and Q(θu) when ``a_q`` is given), with the noise floor."""
    report = {"cad": cad(a0, a_u, circuit), "cad_js": cad_js(a0, a_u),
              "beta": behaviour_ratio(a0, a_u), "circuit_size": circuit.size,
              "circuit_faithfulness": circuit.faithfulness}
    if floor is not None:
        report["noise_floor"] = floor
        report["cad_minus_floor"] = report["cad"] - floor
    if a_q is not None:
        report.update({"cad_q": cad(a0, a_q, circuit), "cad_js_q": cad_js(a0, a_q),
                       "beta_q": behaviour_ratio(a0, a_q)})
        if floor is not None:
            report["cad_q_minus_floor"] = report["cad_q"] - floor
    return report
