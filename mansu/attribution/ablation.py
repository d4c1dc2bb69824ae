"""Patching experiments on node sets: M summed over items with some nodes' outputs replaced by their
counterfactual values (``stem_swap``: the activations on x~; ``mean``: the retain means), or with
some weights zeroed. Each variant costs one forward per batch; M(model) and M(all patched), which
do not depend on the variant, are computed on the first call only, and so are the counterfactual
activations (kept while they fit in ``max_source_bytes``: the selection rules call the evaluator tens
of times with one variant, where recomputing them doubled the cost; a cached value is the same
tensor the pass would compute, so results do not change).

Two read-outs, both normalized by the whole effect of the counterfactual, D = M(model) - M(all
nodes patched), summed over items:
- faithfulness(S) = (M(S clean, rest patched) - M(all patched)) / D  (sufficiency, docs/method.md §3);
- removed(S) = (M(model) - M(S patched, rest clean)) / D  (necessity: the share of the item's
  metric that ablating S takes away; 1 = as much as patching every node).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mansu.attribution.eap_ig import Attribution
from mansu.attribution.metric import counterfactual_rows, iter_batches, kept_logits, pad_id_of, row_metric
from mansu.attribution.nodes import (
    capture,
    eval_mode,
    keep_masks,
    node_hooks,
    node_layout,
    patch_all,
    patch_outside,
)

# A variant: given the batch's counterfactual node values, the context to run the forward in.
Variant = Callable[[dict], AbstractContextManager]


class PatchEvaluator:
    """M on ``items`` (``attr``'s scoring and counterfactual) under node patches and weight edits."""

    def __init__(self, model: nn.Module, tokenizer, items: Sequence, attr: Attribution, *,
                 batch_size: int = 8, progress: bool = True, desc: str = "patching",
                 max_source_bytes: int = 2 << 30):
        self.model, self.attr, self.progress, self.desc = model, attr, progress, desc
        self.layout = node_layout(model)
        self.rows = counterfactual_rows(tokenizer, items, attr.scoring, attr.counterfactual,
                                        attr.neutral_stem)
        self.batch_size = batch_size
        self.pad_id = pad_id_of(tokenizer)
        self.n_nodes = attr.flat().numel()
        self.reference: tuple[float, float] | None = None
        self.max_source_bytes = max_source_bytes
        self._sources: list[dict] | None = None  # counterfactual activations per batch, or None

    def _counterfactual(self, index: int, batch, embed) -> dict:
        """The batch's node activations on x~, from the first pass's copy when it was kept."""
        if self._sources is not None and index < len(self._sources):
            return self._sources[index]
        source: dict = {}
        with node_hooks(self.model, self.layout, capture(source)):
            kept_logits(self.model, embed(batch.corrupt), batch)
        if self._sources is not None and index == len(self._sources):
            self._sources.append(source)
            if sum(t.numel() * t.element_size() for s in self._sources for t in s.values()) \
                    > self.max_source_bytes:
                self._sources = None  # too large to keep: every call recomputes them
        return source

    def faithfulness(self, node_sets: list[Tensor]) -> list[float]:
        totals = self._totals([self._patch(s, inside=False) for s in node_sets])
        clean, patched = self.reference
        return ((totals - patched) / (clean - patched)).tolist()

    def removed(self, node_sets: list[Tensor]) -> list[float]:
        return self.removed_by([self._patch(s, inside=True) for s in node_sets])

    def removed_by(self, variants: list[Variant]) -> list[float]:
        totals = self._totals(variants)
        clean, patched = self.reference
        return ((clean - totals) / (clean - patched)).tolist()

    def _patch(self, nodes: Tensor, *, inside: bool) -> Variant:
        nodes = torch.as_tensor(nodes, dtype=torch.long)
        if inside:  # the complement stays clean
            outside = torch.ones(self.n_nodes, dtype=torch.bool)
            outside[nodes] = False
            nodes = outside.nonzero()[:, 0]
        device = self.model.get_input_embeddings().weight.device
        keep = keep_masks(nodes, self.layout, self.attr.neuron_block, device)
        return lambda source: node_hooks(self.model, self.layout, patch_outside(keep, source))

    def _totals(self, variants: list[Variant]) -> Tensor:
        model, layout, attr = self.model, self.layout, self.attr
        embed = model.get_input_embeddings()
        totals = torch.zeros(len(variants), dtype=torch.float64)
        clean_total = patched_total = 0.0
        batches = iter_batches(self.rows, self.batch_size, self.pad_id, embed.weight.device)
        if self.reference is None and attr.baseline is None:
            self._sources = []
        with eval_mode(model), torch.no_grad():
            for index, batch in enumerate(tqdm(
                    batches, total=math.ceil(len(self.rows) / self.batch_size),
                    desc=f"{self.desc} ({len(variants)} variants)", disable=not self.progress,
                    leave=False)):
                embeds = embed(batch.clean)
                source = (self._counterfactual(index, batch, embed) if attr.baseline is None
                          else attr.baseline.acts)
                if self.reference is None:
                    clean_total += float(row_metric(kept_logits(model, embeds, batch), batch,
                                                    attr.scoring).sum())
                    with node_hooks(model, layout, patch_all(source)):
                        logits = kept_logits(model, embeds, batch)
                    patched_total += float(row_metric(logits, batch, attr.scoring).sum())
                for i, variant in enumerate(variants):
                    with variant(source):
                        logits = kept_logits(model, embeds, batch)
                    totals[i] += float(row_metric(logits, batch, attr.scoring).sum())
        if self.reference is None:
            if abs(clean_total - patched_total) <= 1e-6 * max(1.0, abs(clean_total)):
                raise ValueError("the patching effect is undefined: patching every node to the "
                                 "counterfactual leaves M unchanged on these items")
            self.reference = (clean_total, patched_total)
        return totals


def zeroed(model: nn.Module, weights: dict[str, Tensor]) -> Variant:
    """A variant that sets the listed flat entries of each named parameter to zero, then restores."""
    params = dict(model.named_parameters())

    @contextmanager
    def run(_source):
        saved = {}
        with torch.no_grad():
            for name, index in weights.items():
                flat = params[name].data.view(-1)
                index = index.to(flat.device)
                saved[name] = (index, flat[index].clone())
                flat[index] = 0
        try:
            yield
        finally:
            with torch.no_grad():
                for name, (index, values) in saved.items():
                    params[name].data.view(-1)[index] = values

    return run
