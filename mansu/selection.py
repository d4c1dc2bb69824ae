"""Circuit selection from EAP-IG scores on θ0 (METHOD.md §3): forget-specificity order, grown until
faithfulness on the forget items reaches a threshold (``sufficiency``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mansu.circuit import Circuit
from mansu.eap_ig import Attribution
from mansu.metric import build_rows, iter_batches, kept_logits, neutral_ids, pad_id_of, row_metric
from mansu.nodes import (
    NodeLayout,
    capture,
    eval_mode,
    keep_masks,
    node_hooks,
    node_layout,
    patch_all,
    patch_outside,
)


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
    evaluator = _Faithfulness(model, tokenizer, forget, attr_f, layout, order, batch_size, progress)
    curve = dict(zip(grid, evaluator(grid)))
    chosen = next(s for s in grid if curve[s] >= threshold)
    below = max([s for s in grid if s < chosen], default=0)
    while chosen - below > 1:
        mid = (chosen + below) // 2
        curve[mid] = evaluator([mid])[0]
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


class _Faithfulness:
    """Faithfulness of the top-s nodes of ``order`` for several s in one pass over the items.
    M(model) and M(all patched) do not depend on s and are computed on the first pass only."""

    def __init__(self, model, tokenizer, items, attr: Attribution, layout: NodeLayout,
                 order: Tensor, batch_size: int, progress: bool):
        self.model, self.layout, self.order, self.attr = model, layout, order, attr
        self.progress = progress
        neutral = (neutral_ids(tokenizer, attr.neutral_stem)
                   if attr.counterfactual == "stem_swap" else None)
        self.rows = build_rows(tokenizer, items, attr.scoring, neutral)
        self.batch_size = batch_size
        self.pad_id = pad_id_of(tokenizer)
        self.reference: tuple[float, float] | None = None

    def __call__(self, sizes: list[int]) -> list[float]:
        model, layout, attr = self.model, self.layout, self.attr
        embed = model.get_input_embeddings()
        keeps = [keep_masks(self.order[:s], layout, attr.neuron_block, embed.weight.device)
                 for s in sizes]
        totals = torch.zeros(len(sizes), dtype=torch.float64)
        clean_total = patched_total = 0.0
        batches = iter_batches(self.rows, self.batch_size, self.pad_id, embed.weight.device)
        with eval_mode(model), torch.no_grad():
            for batch in tqdm(batches, total=math.ceil(len(self.rows) / self.batch_size),
                              desc=f"faithfulness ({len(sizes)} sizes)", disable=not self.progress):
                embeds = embed(batch.clean)
                if attr.baseline is None:
                    source: dict = {}
                    with node_hooks(model, layout, capture(source)):
                        kept_logits(model, embed(batch.corrupt), batch)
                else:
                    source = attr.baseline.acts
                if self.reference is None:
                    clean_total += float(row_metric(kept_logits(model, embeds, batch), batch,
                                                     attr.scoring).sum())
                    with node_hooks(model, layout, patch_all(source)):
                        logits = kept_logits(model, embeds, batch)
                    patched_total += float(row_metric(logits, batch, attr.scoring).sum())
                for i, keep in enumerate(keeps):
                    with node_hooks(model, layout, patch_outside(keep, source)):
                        logits = kept_logits(model, embeds, batch)
                    totals[i] += float(row_metric(logits, batch, attr.scoring).sum())
        if self.reference is None:
            if abs(clean_total - patched_total) <= 1e-6 * max(1.0, abs(clean_total)):
                raise ValueError("faithfulness is undefined: patching every node to the "
                                 "counterfactual leaves M unchanged on these items")
            self.reference = (clean_total, patched_total)
        clean_total, patched_total = self.reference
        return ((totals - patched_total) / (clean_total - patched_total)).tolist()

