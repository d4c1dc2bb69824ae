"""Node-level EAP-IG attribution (docs/method.md §3) and its heatmap.

The counterfactual x~ is either ``stem_swap`` (``mansu.attribution.metric``: a neutral stem in place of the
question's tokens) or ``mean``: every node replaced by its mean activation over the retain
questions (all their tokens), the integrated-gradients path then starting from the mean input
embedding. M (``mansu.attribution.metric``) keeps the clean item's targets.

Score of node v, averaged over items: a_v = sum_pos (z_v(x) - z_v(x~)) . (1/m) sum_k dM/dz_v at
input embeddings e(x~) + (k/m)(e(x) - e(x~)), k = 1..m. Per batch: one clean and one counterfactual
forward without gradients, then m forward-backward passes that differentiate M with respect to the
node activations only (no parameter gradients). Nothing is kept across batches except the running
scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mansu.attribution.metric import (
    NEUTRAL_STEM,
    SCORINGS,
    Batch,
    build_rows,
    counterfactual_rows,
    iter_batches,
    kept_logits,
    pad_id_of,
    row_metric,
)
from mansu.attribution.nodes import (
    HEADS,
    NodeLayout,
    block_sum,
    capture,
    eval_mode,
    node_hooks,
    node_layout,
    patch_all,
)
from mansu.data import MCQ

COUNTERFACTUALS = ("stem_swap", "mean")


@dataclass
class MeanBaseline:
    """The ``mean`` counterfactual: each node's mean activation and the mean input embedding."""

    embed: Tensor  # [d_model]
    acts: dict[tuple[str, int], Tensor]  # (kind, layer) -> [width]


@dataclass
class Attribution:
    """EAP-IG scores averaged over items: ``heads`` [L, H], ``neurons`` [L, ceil(N / block)].

    ``metric_clean`` [n_items] is M on each item; ``metric_corrupt`` is M on its counterfactual
    (``stem_swap``: the swapped input; ``mean``: every node replaced by its mean)."""

    heads: Tensor
    neurons: Tensor
    metric_clean: Tensor
    metric_corrupt: Tensor
    scoring: str
    counterfactual: str
    neuron_block: int
    ig_steps: int
    neutral_stem: str
    baseline: MeanBaseline | None = field(default=None, repr=False)

    def flat(self) -> Tensor:
        """All node scores, heads (layer-major) then neuron blocks (layer-major)."""
        return torch.cat([self.heads.flatten(), self.neurons.flatten()])


def attribute(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCQ] | Sequence[str],
    *,
    scoring: str = "cloze",
    counterfactual: str = "stem_swap",
    ig_steps: int = 5,
    batch_size: int = 8,
    neuron_block: int = 1,
    mean_items: Sequence[MCQ] | Sequence[str] | None = None,
    neutral_stem: str = NEUTRAL_STEM,
    progress: bool = True,
) -> Attribution:
    """EAP-IG node scores of ``model`` on ``items`` (batch_size counts token sequences: one per
    question for letter scoring, one per choice for cloze). ``mean_items`` (the retain questions)
    are required by and only used for ``counterfactual="mean"``."""
    setup = counterfactual_setup(model, tokenizer, items, scoring=scoring,
                                 counterfactual=counterfactual, ig_steps=ig_steps,
                                 batch_size=batch_size, neuron_block=neuron_block,
                                 mean_items=mean_items, neutral_stem=neutral_stem)
    layout = setup.layout
    heads = torch.zeros(layout.n_layers, layout.n_heads)
    neurons = torch.zeros(layout.n_layers, layout.n_neurons)
    metric_clean = torch.zeros(len(items))
    metric_corrupt = torch.zeros(len(items))
    for part in ig_passes(model, tokenizer, setup, scoring=scoring, ig_steps=ig_steps,
                          batch_size=batch_size, progress=progress):
        metric_clean.index_add_(0, part.batch.items, part.m_clean.cpu())
        metric_corrupt.index_add_(0, part.batch.items, part.m_corrupt.cpu())
        for step_heads, step_neurons in part.step_rows():
            heads += step_heads.sum(0)
            neurons += step_neurons.sum(0)
    n = len(items)
    return Attribution(
        heads=heads / (ig_steps * n),
        neurons=block_sum(neurons, neuron_block) / (ig_steps * n),
        metric_clean=metric_clean,
        metric_corrupt=metric_corrupt,
        scoring=scoring,
        counterfactual=counterfactual,
        neuron_block=neuron_block,
        ig_steps=ig_steps,
        neutral_stem=neutral_stem,
        baseline=setup.baseline,
    )


# ---------------------------------------------------------------------------------------------
# The one EAP-IG loop: ``attribute``, ``mansu.attribution.items.attribute_items`` and
# ``mansu.attribution.items.write_gradients`` all walk it, each summing what it needs in its own
# order.


@dataclass
class CounterfactualSetup:
    """What every pass over one item set shares: the node layout, the token rows (with x~'s tokens
    for ``stem_swap``) and, for ``mean``, the baseline x~ is made of."""

    layout: NodeLayout
    rows: list
    baseline: MeanBaseline | None


def counterfactual_setup(model: nn.Module, tokenizer, items: Sequence, *, scoring: str,
                         counterfactual: str, ig_steps: int, batch_size: int, neuron_block: int,
                         mean_items: Sequence | None, neutral_stem: str) -> CounterfactualSetup:
    """Check the settings and build x~ for ``items``: for ``mean``, this model's mean baseline
    over ``mean_items`` (required); for ``stem_swap``, the rows' neutral-stem tokens."""
    check_settings(scoring, counterfactual, ig_steps, neuron_block)
    if not items:
        raise ValueError("no items to attribute")
    layout = node_layout(model)
    baseline = None
    if counterfactual == "mean":
        if not mean_items:
            raise ValueError("counterfactual='mean' needs mean_items (the retain questions)")
        baseline = mean_baseline(model, tokenizer, mean_items, scoring=scoring,
                                 batch_size=batch_size)
    rows = counterfactual_rows(tokenizer, items, scoring, counterfactual, neutral_stem)
    return CounterfactualSetup(layout, rows, baseline)


@dataclass
class BatchPass:
    """One batch of the loop: its clean and counterfactual forwards (``endpoints``: input
    embeddings, node activation differences ``diffs``, M on both sides), and its IG path."""

    index: int  # the batch's position in the loop (``write_gradients``' list is indexed by it)
    batch: Batch
    clean_embeds: Tensor
    corrupt_embeds: Tensor
    diffs: dict
    m_clean: Tensor
    m_corrupt: Tensor
    model: nn.Module = field(repr=False)
    layout: NodeLayout = field(repr=False)
    scoring: str = "cloze"
    ig_steps: int = 5

    def points(self) -> Iterator[Tensor]:
        """The IG path's input embeddings e(x~) + (k/m)(e(x) - e(x~)), k = 1..m."""
        for k in range(1, self.ig_steps + 1):
            yield self.corrupt_embeds + (k / self.ig_steps) * (self.clean_embeds - self.corrupt_embeds)

    def step_rows(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Per path point, ``ig_step_rows``: [B, L, H] and [B, L, N]."""
        for embeds in self.points():
            yield ig_step_rows(self.model, self.layout, self.batch, self.scoring, self.diffs,
                               embeds)


def ig_passes(model: nn.Module, tokenizer, setup: CounterfactualSetup, *, scoring: str,
              ig_steps: int, batch_size: int, progress: bool = True,
              desc: str = "attribution") -> Iterator[BatchPass]:
    """``setup``'s rows in batches of ``batch_size``, in eval mode: each batch's ``BatchPass``,
    whose path (``points``, ``step_rows``) the consumer walks before it takes the next."""
    device = model.get_input_embeddings().weight.device
    batches = iter_batches(setup.rows, batch_size, pad_id_of(tokenizer), device)
    total = math.ceil(len(setup.rows) / batch_size)
    with eval_mode(model):
        for index, batch in enumerate(tqdm(batches, total=total, desc=desc, disable=not progress,
                                           leave=False)):
            yield BatchPass(index, batch,
                            *endpoints(model, setup.layout, batch, scoring, setup.baseline),
                            model=model, layout=setup.layout, scoring=scoring, ig_steps=ig_steps)


@torch.no_grad()
def endpoints(model, layout: NodeLayout, batch: Batch, scoring: str,
               baseline: MeanBaseline | None) -> tuple[Tensor, Tensor, dict, Tensor, Tensor]:
    """The clean and counterfactual forwards of one batch: both input embeddings, the node
    activation differences z(x) - z(x~) (float32, zero at padding) and M on both sides."""
    embed = model.get_input_embeddings()
    clean_embeds = embed(batch.clean)
    diffs: dict = {}
    with node_hooks(model, layout, capture(diffs)):
        m_clean = row_metric(kept_logits(model, clean_embeds, batch), batch, scoring)

    def subtract(kind, layer, counterfactual):
        # In place of the clean activation, so that one copy per node is alive at a time.
        real = batch.mask[..., None].to(counterfactual.device)
        diffs[kind, layer] = (diffs[kind, layer].float() - counterfactual.float()) * real

    if baseline is None:
        corrupt_embeds = embed(batch.corrupt)
        with node_hooks(model, layout, subtract):
            m_corrupt = row_metric(kept_logits(model, corrupt_embeds, batch), batch, scoring)
    else:
        corrupt_embeds = baseline.embed.expand_as(clean_embeds)
        with node_hooks(model, layout, patch_all(baseline.acts)):
            m_corrupt = row_metric(kept_logits(model, clean_embeds, batch), batch, scoring)
        for kind, layer in list(diffs):
            subtract(kind, layer, baseline.acts[kind, layer].expand_as(diffs[kind, layer]))
    return clean_embeds, corrupt_embeds, diffs, m_clean, m_corrupt


def ig_step_rows(model, layout: NodeLayout, batch: Batch, scoring: str, diffs: dict,
                 embeds: Tensor) -> tuple[Tensor, Tensor]:
    """One integrated-gradients point: per row, the sum over positions of diff . dM/dz per node,
    [B, L, H] and [B, L, N]."""
    acts: dict = {}
    with torch.enable_grad():
        embeds = embeds.detach().requires_grad_(True)
        with node_hooks(model, layout, capture(acts)):
            metric = row_metric(kept_logits(model, embeds, batch), batch, scoring).sum()
        keys = list(acts)
        # Only the activations are differentiated: autograd skips every parameter gradient.
        grads = torch.autograd.grad(metric, [acts[key] for key in keys], allow_unused=True)
    rows = batch.clean.shape[0]
    heads = torch.zeros(rows, layout.n_layers, layout.n_heads)
    neurons = torch.zeros(rows, layout.n_layers, layout.n_neurons)
    for (kind, layer), grad in zip(keys, grads):
        if grad is None:
            continue
        per_unit = (grad.float() * diffs[kind, layer]).sum(1).cpu()
        if kind == HEADS:
            heads[:, layer] = per_unit.view(rows, layout.n_heads, layout.head_dim).sum(-1)
        else:
            neurons[:, layer] = per_unit
    return heads, neurons


def mean_baseline(model: nn.Module, tokenizer, items: Sequence, *, scoring: str,
                  batch_size: int = 8) -> MeanBaseline:
    """Mean node activations and mean input embedding over every token of ``items``' prompts."""
    layout = node_layout(model)
    embed = model.get_input_embeddings()
    rows = build_rows(tokenizer, items, scoring, None)
    sums: dict = {}
    embed_sum = 0.0
    count = 0
    with eval_mode(model), torch.no_grad():
        for batch in iter_batches(rows, batch_size, pad_id_of(tokenizer), embed.weight.device):
            weights = batch.mask[..., None].float()
            embeds = embed(batch.clean)
            acts: dict = {}
            with node_hooks(model, layout, capture(acts)):
                kept_logits(model, embeds, batch)
            for key, z in acts.items():
                sums[key] = sums.get(key, 0.0) + (z.float() * weights).sum((0, 1))
            embed_sum = embed_sum + (embeds.float() * weights).sum((0, 1))
            count += int(batch.mask.sum())
    dtype = embed.weight.dtype
    return MeanBaseline(embed=(embed_sum / count).to(dtype),
                        acts={key: (total / count).to(dtype) for key, total in sums.items()})



def check_settings(scoring: str, counterfactual: str, ig_steps: int, neuron_block: int) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    if counterfactual not in COUNTERFACTUALS:
        raise ValueError(f"unknown counterfactual {counterfactual!r}; expected {COUNTERFACTUALS}")
    if ig_steps < 1 or neuron_block < 1:
        raise ValueError("ig_steps and neuron_block must be at least 1")



# ---------------------------------------------------------------------------------------------
# Plot


def plot_attribution(before: Attribution, after: Attribution, path, *,
                     labels: tuple[str, str] = ("θ0", "θu"), max_columns: int = 128):
    """PNG: heads (layer x head) and neurons (layer x neuron block, adjacent blocks summed into
    at most ``max_columns`` columns) of two attributions side by side, one colour scale per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_column = math.ceil(before.neurons.shape[1] / max_columns)
    panels = [(before.heads, after.heads, "heads", "head"),
              (_fold(before.neurons, per_column), _fold(after.neurons, per_column), "neurons",
               f"neuron group ({before.neuron_block * per_column} neurons each)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False, layout="constrained")
    for row, (left, right, title, xlabel) in enumerate(panels):
        limit = float(max(left.abs().max(), right.abs().max())) or 1.0
        for col, (scores, label) in enumerate(((left, labels[0]), (right, labels[1]))):
            ax = axes[row][col]
            image = ax.imshow(scores.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit,
                              vmax=limit, interpolation="nearest")
            ax.set(title=f"{label}: {title}", xlabel=xlabel, ylabel="layer")
            for axis in (ax.xaxis, ax.yaxis):
                axis.get_major_locator().set_params(integer=True)
        fig.colorbar(image, ax=axes[row].tolist(), label="EAP-IG score")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fold(scores: Tensor, per_column: int) -> Tensor:
    return block_sum(scores, per_column) if per_column > 1 else scores
