"""The ``necessity`` selection rule: a small forget set of weights that is safe for retain.

Where it departs from docs/method.md §3 (whose rule, kept as ``select: sufficiency``, grows the circuit
by forget-specificity until the circuit alone reproduces 0.8 of M):
1. Nodes are taken in order of their forget EAP-IG score a_f (> 0 only: a node whose patching would
   raise M is never a reason to forget), and a set S is judged by ablation, not sufficiency:
   removed(S) = (M(model) - M(S patched to x~)) / (M(model) - M(all patched)) on the forget items,
   and the same on the retain items (``mansu.attribution.ablation``). S grows until forget removed >= X
   (``forget_removed``) while retain removed <= Y (``retain_removed``); a node whose addition
   breaks the retain bound is skipped. To bound the passes, candidates come in blocks that double
   after each accepted block; one pass evaluates the block and its halving prefixes (k, k/2, .., 1
   nodes) on both item sets, the smallest prefix that reaches X (else the largest that keeps
   retain within Y) is accepted, and when not even one node fits it is skipped. At most
   ``max_evaluations`` node sets are tried; the record says whether X was reached.
2. Inside the chosen nodes only the ``share_of_parameters`` (of the quantized Linear weights) with
   the highest forget-over-retain Fisher saliency are kept (``mansu.attribution.saliency``); the Circuit
   carries them, and ``parameter_mask`` returns them.
3. Recorded (metrics.circuit): the evaluated ablation trajectory, the forget/retain ablation curve
   of the plain a_f ranking on a geometric grid (``curve_points`` sizes), the chosen weights'
   share and their own ablation (zeroed), and the stability of the whole rule across two disjoint
   halves of the forget items (Jaccard of nodes and of weights).

Measured on the tiny default model, 8 facts (docs/results/circuit_selection.md): 37 nodes remove 0.507 of
the forget metric and 0.076 of the retain one; 0.50% of the quantized weights kept; node Jaccard
across halves 0.0. Not yet measured on SmolLM2.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mansu.attribution.ablation import PatchEvaluator, zeroed
from mansu.attribution.circuit import Circuit, node_mask
from mansu.attribution.eap_ig import Attribution, attribute
from mansu.attribution.nodes import node_layout
from mansu.attribution.saliency import metric_fisher, quantized_weight_names, salient_weights


def grow_necessary(forget_eval: PatchEvaluator, retain_eval: PatchEvaluator, order: Tensor, *,
                   forget_removed: float, retain_removed: float, max_evaluations: int
                   ) -> tuple[list[int], list[list]]:
    """Nodes of ``order`` accepted by the rule (module docstring, 1.) and every evaluated set as
    [size, forget removed, retain removed, accepted]."""
    accepted: list[int] = []
    trajectory: list[list] = []
    candidates = order.tolist()
    position, block, evaluations, reached = 0, 1, 0, False
    while position < len(candidates) and evaluations < max_evaluations and not reached:
        block = min(block, len(candidates) - position, max_evaluations - evaluations)
        sizes = sorted({max(1, block >> k) for k in range(block.bit_length())}, reverse=True)
        sets = [torch.tensor(accepted + candidates[position:position + k]) for k in sizes]
        forget, retain = forget_eval.removed(sets), retain_eval.removed(sets)
        evaluations += len(sets)
        fits = [i for i in range(len(sizes)) if retain[i] <= retain_removed]
        reaching = [i for i in fits if forget[i] >= forget_removed]
        chosen = reaching[-1] if reaching else (fits[0] if fits else None)
        for i, k in enumerate(sizes):
            trajectory.append([len(accepted) + k, forget[i], retain[i], i == chosen])
        if chosen is None:
            position, block = position + 1, 1  # the next node alone breaks the retain bound
            continue
        k = sizes[chosen]
        accepted += candidates[position:position + k]
        position += k
        reached = bool(reaching)
        block = 2 * k if chosen == 0 else k
    return accepted, trajectory


class FisherCache:
    """Per-weight metric Fisher of one item set, computed for each parameter at most once."""

    def __init__(self, model, tokenizer, items, attr: Attribution):
        self.args, self.values = (model, tokenizer, items, attr), {}

    def __call__(self, names: Sequence[str]) -> dict[str, Tensor]:
        missing = [name for name in names if name not in self.values]
        self.values.update(metric_fisher(*self.args, missing))
        return {name: self.values[name] for name in names}


def select_necessary(
    model: nn.Module,
    tokenizer,
    forget: Sequence,
    retain: Sequence,
    attr_f: Attribution,
    attr_r: Attribution,
    *,
    forget_removed: float = 0.5,
    retain_removed: float = 0.2,
    share_of_parameters: float = 0.005,
    max_evaluations: int = 40,
    curve_points: int = 8,
    retain_floor: float = 0.1,
    skip_modules: Sequence[str] = ("lm_head",),
    batch_size: int = 8,
    progress: bool = True,
    retain_eval: PatchEvaluator | None = None,
    retain_fisher: FisherCache | None = None,
) -> Circuit:
    """The ``necessity`` rule on θ0 (module docstring). ``retain_eval`` / ``retain_fisher``
    reuse the retain side's measurements across calls on the same retain items."""
    if not 0.0 < forget_removed <= 1.0 or retain_removed < 0.0:
        raise ValueError(f"necessity needs 0 < forget_removed <= 1 and retain_removed >= 0, got "
                         f"{forget_removed} and {retain_removed}")
    if not 0.0 < share_of_parameters <= 1.0:
        raise ValueError(f"share_of_parameters must be in (0, 1], got {share_of_parameters}")
    if attr_f.flat().shape != attr_r.flat().shape:
        raise ValueError("forget and retain attributions have different node sets "
                         "(same model and neuron_block needed)")
    scores = attr_f.flat()
    order = scores.argsort(descending=True)
    order = order[scores[order] > 0]
    if order.numel() == 0:
        raise ValueError("no node has a positive forget attribution: nothing to ablate")
    common = {"batch_size": batch_size, "progress": progress}
    forget_eval = PatchEvaluator(model, tokenizer, forget, attr_f, desc="forget ablation", **common)
    retain_eval = retain_eval or PatchEvaluator(model, tokenizer, retain, attr_r,
                                                desc="retain ablation", **common)
    nodes, trajectory = grow_necessary(forget_eval, retain_eval, order,
                                       forget_removed=forget_removed,
                                       retain_removed=retain_removed,
                                       max_evaluations=max_evaluations)
    if not nodes:
        raise ValueError(f"attribution.select=necessity: no node among those tried can be ablated "
                         f"without removing more than retain_removed={retain_removed} of the "
                         f"retain metric (raise it, or use select=sufficiency)")
    chosen = torch.tensor(nodes)
    # The chosen set's own numbers (and its faithfulness, docs/method.md's read-out) in one pass.
    forget_at, faithful = forget_eval.removed([chosen])[0], forget_eval.faithfulness([chosen])[0]
    retain_at = retain_eval.removed([chosen])[0]
    curve = []
    if curve_points > 0:
        grid = sorted({max(1, round(s)) for s in torch.logspace(
            0, math.log10(order.numel()), curve_points).tolist()})
        prefixes = [order[:s] for s in grid]
        curve = [list(point) for point in zip(grid, forget_eval.removed(prefixes),
                                              retain_eval.removed(prefixes))]

    layout = node_layout(model)
    n_head_nodes = layout.n_layers * layout.n_heads
    selected = torch.zeros(scores.numel(), dtype=torch.bool)
    selected[chosen] = True
    circuit = Circuit(heads=selected[:n_head_nodes].view(layout.n_layers, layout.n_heads),
                      neurons=selected[n_head_nodes:].view(layout.n_layers, -1),
                      neuron_block=attr_f.neuron_block, curve=[(len(nodes), faithful)],
                      faithfulness=faithful, rule="necessity")

    quantized = quantized_weight_names(model, skip_modules)
    total = sum(quantized.values())
    owned = {name: mask for name, mask in node_mask(model, circuit).items() if name in quantized}
    node_entries = sum(int(mask.sum()) for mask in owned.values())
    budget = max(1, round(share_of_parameters * total))
    retain_fisher = retain_fisher or FisherCache(model, tokenizer, retain, attr_r)
    names = list(owned)
    forget_fisher = metric_fisher(model, tokenizer, forget, attr_f, names) if node_entries > budget else {}
    weights = salient_weights(owned, forget_fisher, retain_fisher(names) if forget_fisher else {},
                              budget, retain_floor=retain_floor)
    circuit.weights = weights
    entries = sum(int(index.numel()) for index in weights.values())
    ablate = [zeroed(model, weights)]
    circuit.report = {
        "necessity": {"forget_removed_target": forget_removed,
                      "retain_removed_max": retain_removed, "reached": forget_at >= forget_removed,
                      "forget_removed": forget_at, "retain_removed": retain_at,
                      "evaluations": len(trajectory),
                      "trajectory": trajectory, "ranking_curve": curve},
        "weights": {"budget": budget, "entries": entries, "quantized_entries": total,
                    "share_of_quantized": entries / total,
                    "node_share_of_quantized": node_entries / total,
                    "zeroed_forget_removed": forget_eval.removed_by(ablate)[0],
                    "zeroed_retain_removed": retain_eval.removed_by(ablate)[0]},
    }
    return circuit


def stability(model: nn.Module, tokenizer, forget: Sequence, retain: Sequence, attr_r: Attribution,
              *, attribute_kwargs: dict, seed: int = 0, retain_eval: PatchEvaluator | None = None,
              retain_fisher: FisherCache | None = None, **knobs) -> dict:
    """The rule rerun on two disjoint halves of the forget items (each with its own EAP-IG scores;
    retain as before): Jaccard of their node sets and of their weight sets."""
    if len(forget) < 2:
        raise ValueError("stability needs at least 2 forget items")
    order = list(range(len(forget)))
    random.Random(seed).shuffle(order)
    halves = [[forget[i] for i in order[: len(order) // 2]],
              [forget[i] for i in order[len(order) // 2:]]]
    picked = []
    for half in halves:
        attr = attribute(model, tokenizer, half, **attribute_kwargs)
        try:
            picked.append(select_necessary(model, tokenizer, half, retain, attr, attr_r,
                                           curve_points=0, retain_eval=retain_eval,
                                           retain_fisher=retain_fisher, **knobs))
        except ValueError as err:  # a half may admit no selection: say so, keep the run
            return {"undefined": str(err)}
    first, second = picked
    return {"node_jaccard": _jaccard_nodes(first.flat(), second.flat()),
            "weight_jaccard": _jaccard_weights(first.weights, second.weights),
            "half_nodes": [c.size for c in picked],
            "half_forget_removed": [c.report["necessity"]["forget_removed"] for c in picked],
            "half_retain_removed": [c.report["necessity"]["retain_removed"] for c in picked]}


def _jaccard_nodes(a: Tensor, b: Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _jaccard_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    common = sum(int(torch.isin(a[name], b[name]).sum()) for name in a.keys() & b.keys())
    union = sum(int(i.numel()) for i in a.values()) + sum(int(i.numel()) for i in b.values()) - common
    return common / union if union else 1.0
