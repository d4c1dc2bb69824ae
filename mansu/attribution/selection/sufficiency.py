"""The ``sufficiency`` selection rule (docs/method.md §3): nodes in forget-specificity order, grown until
the circuit's faithfulness on the forget items reaches a threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mansu.attribution.ablation import PatchEvaluator
from mansu.attribution.circuit import Circuit
from mansu.attribution.eap_ig import Attribution
from mansu.attribution.nodes import node_layout


def specificity(attr_f: Attribution, attr_r: Attribution, lam: float = 1.0) -> Tensor:
    """|a_f| / ||a_f||_1 - lam |a_r| / ||a_r||_1 per node (flat order)."""
    forget, retain = attr_f.flat().abs(), attr_r.flat().abs()
    if forget.shape != retain.shape:
        raise ValueError("forget and retain attributions have different node sets "
                         "(same model and neuron_block needed)")
    if forget.sum() == 0:
        raise ValueError("every forget attribution score is zero: nothing to rank")
    return forget / forget.sum() - lam * retain / retain.sum().clamp_min(1e-30)


def select_circuit(
    model: nn.Module,
    tokenizer,
    forget: Sequence,
    attr_f: Attribution,
    attr_r: Attribution,
    *,
    threshold: float = 0.8,
    lam: float = 1.0,
    curve_points: int = 16,
    batch_size: int = 8,
    progress: bool = True,
) -> Circuit:
    """Add nodes in order of forget-specificity until faithfulness on ``forget`` reaches
    ``threshold``. Faithfulness = (M(circuit clean, rest patched to x~) - M(all patched)) /
    (M(model) - M(all patched)), summed over items, with ``attr_f``'s scoring and counterfactual.
    Sizes are tried on a geometric grid, then bisected between the last grid size below the
    threshold and the first at or above it (faithfulness is treated as monotone there)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"faithfulness threshold must be in (0, 1], got {threshold}")
    layout = node_layout(model)
    order = specificity(attr_f, attr_r, lam).argsort(descending=True)
    n_nodes = order.numel()
    grid = sorted({max(1, round(s)) for s in torch.logspace(
        0, math.log10(n_nodes), curve_points).tolist()} | {n_nodes})
    evaluator = PatchEvaluator(model, tokenizer, forget, attr_f, batch_size=batch_size,
                               progress=progress, desc="faithfulness")
    curve = dict(zip(grid, evaluator.faithfulness([order[:s] for s in grid])))
    chosen = next(s for s in grid if curve[s] >= threshold)
    below = max([s for s in grid if s < chosen], default=0)
    while chosen - below > 1:
        mid = (chosen + below) // 2
        curve[mid] = evaluator.faithfulness([order[:mid]])[0]
        below, chosen = (below, mid) if curve[mid] >= threshold else (mid, chosen)
    selected = torch.zeros(n_nodes, dtype=torch.bool)
    selected[order[:chosen]] = True
    n_head_nodes = layout.n_layers * layout.n_heads
    return Circuit(
        heads=selected[:n_head_nodes].view(layout.n_layers, layout.n_heads),
        neurons=selected[n_head_nodes:].view(layout.n_layers, -1),
        neuron_block=attr_f.neuron_block,
        curve=sorted(curve.items()),
        faithfulness=curve[chosen],
        threshold=threshold,
    )


