"""EAP-IG kept per item (``mansu.cad.divergence``): every noise-floor half is a mean of rows computed once.

Besides the node scores, each item keeps its node activation differences z(x) - z(x~) at the
positions where M reads the answer, and each node's direct effect on M: what the node writes to the
residual stream, W_out,v (z_v(x) - z_v(x~)), read by an unembedding on the item's own answer tokens
(θ0's when comparing models, so that only the circuit's write can move it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mansu.attribution.circuit import Circuit
from mansu.attribution.eap_ig import Attribution, counterfactual_setup, ig_passes
from mansu.attribution.metric import NEUTRAL_STEM, Batch, kept_logits, row_metric
from mansu.attribution.nodes import HEADS, NEURONS, NodeLayout, block_sum, find_module, node_layout
from mansu.data import MCQ

FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")


@dataclass
class ItemAttribution:
    """``attribute``'s numbers kept per item. ``scores`` [n_items, n_nodes] (flat node order) and
    ``diffs`` (kind, layer) -> [n_items, width]: each node unit's z(x) - z(x~) summed over the
    positions where M reads the answer and over the item's rows. ``direct`` [n_items, n_nodes]:
    each node's direct effect on M through the readout. ``attribution`` is the scores' mean, the
    same as ``attribute`` on these items."""

    scores: Tensor
    diffs: dict
    attribution: Attribution
    direct: Tensor
    frozen: Tensor  # [n_items, n_nodes]: the scores with θ0's gradient (``frozen_gradients``)
    has_scores: bool = True  # False: the EAP-IG passes were skipped (``scores`` is zero)

    @property
    def n_items(self) -> int:
        return self.scores.shape[0]

    def keep_units(self, circuit: Circuit) -> ItemAttribution:
        """Only the circuit's units' diffs (what CAD reads), to keep θ0's cached copy small."""
        keep = circuit_units(circuit, self.diffs)
        return ItemAttribution(self.scores, {k: v[:, keep[k]] for k, v in self.diffs.items()},
                               self.attribution, self.direct, self.frozen, self.has_scores)


def circuit_units(circuit: Circuit, diffs: dict) -> dict:
    """(kind, layer) -> [width] bool: the activation units of the circuit's nodes."""
    keep = {}
    for (kind, layer), values in diffs.items():
        width = values.shape[-1]
        if kind == HEADS:
            heads = circuit.heads[layer]
            keep[kind, layer] = heads.repeat_interleave(width // heads.numel())
        else:
            keep[kind, layer] = circuit.neurons[layer].repeat_interleave(circuit.neuron_block)[:width]
    return keep


def attribute_items(
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
    readout: Tensor | None = None,
    frozen_gradients: list[dict] | None = None,
    scores: bool = True,
    progress: bool = True,
) -> ItemAttribution:
    """``attribute`` with the scores and node activation differences kept per item, at the same
    cost (the same passes; only the sums are split by item). ``direct`` is each node's direct
    effect on M through ``readout`` ([vocab, d_model], default this model's ``readout_matrix``):
    Σ over M's read entries of weight · <readout[token], W_out,v (z_v(x) - z_v(x~))>.
    ``frozen_gradients`` (``write_gradients`` of θ0 on the same items and batch size) gives
    ``frozen``: the EAP-IG score with θ0's gradient in place of this model's, Σ_pos <g0(pos),
    W_out,v (z_v(x) - z_v(x~))(pos)>, for the nodes of the layers it holds (0 elsewhere).
    ``scores=False`` skips the ``ig_steps`` forward-backward passes (most of the cost): ``scores``
    and the attribution's node scores are then zero, and ``has_scores`` says so."""
    setup = counterfactual_setup(model, tokenizer, items, scoring=scoring,
                                 counterfactual=counterfactual, ig_steps=ig_steps,
                                 batch_size=batch_size, neuron_block=neuron_block,
                                 mean_items=mean_items, neutral_stem=neutral_stem)
    layout = setup.layout
    n, n_blocks = len(items), layout.n_blocks(neuron_block)
    heads = torch.zeros(n, layout.n_layers, layout.n_heads)
    neurons = torch.zeros(n, layout.n_layers, n_blocks)
    direct_heads = torch.zeros(n, layout.n_layers, layout.n_heads)
    direct_neurons = torch.zeros(n, layout.n_layers, n_blocks)
    frozen_heads = torch.zeros(n, layout.n_layers, layout.n_heads)
    frozen_neurons = torch.zeros(n, layout.n_layers, n_blocks)
    diffs: dict = {}
    metric_clean, metric_corrupt = torch.zeros(n), torch.zeros(n)
    device = model.get_input_embeddings().weight.device
    readout = (readout_matrix(model) if readout is None else readout).to(device)
    projections = output_projections(model)
    for part in ig_passes(model, tokenizer, setup, scoring=scoring, ig_steps=ig_steps,
                          batch_size=batch_size, progress=progress):
        batch = part.batch
        gradients = frozen_gradients[part.index] if frozen_gradients is not None else {}
        metric_clean.index_add_(0, batch.items, part.m_clean.cpu())
        metric_corrupt.index_add_(0, batch.items, part.m_corrupt.cpu())
        read = batch.keep[..., None]
        for key, diff in part.diffs.items():
            per_row = (diff * read).sum(1).cpu()
            if key not in diffs:
                diffs[key] = torch.zeros(n, per_row.shape[-1])
            diffs[key].index_add_(0, batch.items, per_row)
            projection = projections[key].to(device)
            _add_nodes(direct_heads, direct_neurons, key, batch.items, neuron_block, layout,
                       _direct_effect(diff, batch, readout, projection).cpu())
            if key in gradients:
                _add_nodes(frozen_heads, frozen_neurons, key, batch.items, neuron_block, layout,
                           _frozen_score(gradients[key], diff, projection))
        for row_heads, row_neurons in (part.step_rows() if scores else ()):
            heads.index_add_(0, batch.items, row_heads)
            neurons.index_add_(0, batch.items, block_sum(
                row_neurons.flatten(0, 1), neuron_block).view(-1, layout.n_layers, n_blocks))
    heads, neurons = heads / ig_steps, neurons / ig_steps
    mean = Attribution(heads=heads.mean(0), neurons=neurons.mean(0), metric_clean=metric_clean,
                       metric_corrupt=metric_corrupt, scoring=scoring,
                       counterfactual=counterfactual, neuron_block=neuron_block,
                       ig_steps=ig_steps, neutral_stem=neutral_stem, baseline=setup.baseline)
    return ItemAttribution(torch.cat([heads.flatten(1), neurons.flatten(1)], 1), diffs, mean,
                           torch.cat([direct_heads.flatten(1), direct_neurons.flatten(1)], 1),
                           torch.cat([frozen_heads.flatten(1), frozen_neurons.flatten(1)], 1),
                           has_scores=scores)


def write_gradients(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCQ] | Sequence[str],
    keys,
    *,
    scoring: str = "cloze",
    counterfactual: str = "stem_swap",
    ig_steps: int = 5,
    batch_size: int = 8,
    neuron_block: int = 1,
    mean_items: Sequence[MCQ] | Sequence[str] | None = None,
    neutral_stem: str = NEUTRAL_STEM,
    progress: bool = True,
) -> tuple[list[dict], Tensor]:
    """θ0's gradients for the ``frozen`` scores, and θ0's own frozen scores [n_items, n_nodes].

    Per batch, (kind, layer) -> [B, T, d_model] (CPU, float32): dM/d(output of that layer's head
    or neuron output projection), averaged over the integrated-gradients path, for ``keys`` only.
    Through W_out,v it is every node's EAP-IG gradient; kept from θ0 it scores a later model's
    circuit writes by θ0's downstream (``attribute_items(frozen_gradients=)``). Settings as
    ``attribute_items``'s, whose batches are the same."""
    setup = counterfactual_setup(model, tokenizer, items, scoring=scoring,
                                 counterfactual=counterfactual, ig_steps=ig_steps,
                                 batch_size=batch_size, neuron_block=neuron_block,
                                 mean_items=mean_items, neutral_stem=neutral_stem)
    layout = setup.layout
    device = model.get_input_embeddings().weight.device
    structure = {HEADS: layout.structure.head_out, NEURONS: layout.structure.neuron_out}
    modules = {key: model.get_submodule(layout.module_name(key[1], structure[key[0]]))
               for key in sorted(keys)}
    projections = output_projections(model, modules)
    n, n_blocks = len(items), layout.n_blocks(neuron_block)
    heads = torch.zeros(n, layout.n_layers, layout.n_heads)
    neurons = torch.zeros(n, layout.n_layers, n_blocks)
    out = []
    for part in ig_passes(model, tokenizer, setup, scoring=scoring, ig_steps=ig_steps,
                          batch_size=batch_size, progress=progress, desc="θ0 gradients"):
        sums = {key: 0.0 for key in modules}
        for embeds in part.points():
            grads = _output_gradients(model, modules, part.batch, scoring, embeds)
            sums = {key: sums[key] + grads[key] for key in modules}
        gradients = {key: (total / ig_steps).cpu() for key, total in sums.items()}
        for key, gradient in gradients.items():
            _add_nodes(heads, neurons, key, part.batch.items, neuron_block, layout,
                       _frozen_score(gradient, part.diffs[key], projections[key].to(device)))
        out.append(gradients)
    return out, torch.cat([heads.flatten(1), neurons.flatten(1)], 1)


def _output_gradients(model, modules: dict, batch: Batch, scoring: str, embeds: Tensor) -> dict:
    outputs: dict = {}
    handles = [module.register_forward_hook(
        lambda _m, _args, output, key=key: outputs.__setitem__(key, output))
        for key, module in modules.items()]
    try:
        with torch.enable_grad():
            embeds = embeds.detach().requires_grad_(True)
            metric = row_metric(kept_logits(model, embeds, batch), batch, scoring).sum()
            keys = list(outputs)
            grads = torch.autograd.grad(metric, [outputs[key] for key in keys], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return {key: (torch.zeros_like(outputs[key]) if g is None else g).float()
            for key, g in zip(keys, grads)}


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm before the unembedding, if the model has one with a gain."""
    for name in FINAL_NORMS:
        norm = find_module(model, name)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return norm
    return None


def final_norm_name(model: nn.Module) -> str | None:
    norm = final_norm(model)
    return None if norm is None else next(n for n, m in model.named_modules() if m is norm)


def readout_matrix(model: nn.Module) -> Tensor:
    """float32 [vocab, d_model]: the unembedding with the final norm's gain folded in, i.e. how a
    residual-stream vector is read as logits up to the norm's per-position scale."""
    unembed = model.get_output_embeddings().weight.detach().float()
    norm = final_norm(model)
    return unembed if norm is None else unembed * norm.weight.detach().float()


def output_projections(model: nn.Module, keys=None) -> dict:
    """(kind, layer) -> float32 [d_model, width] output projection of each node kind and layer
    (all, or only ``keys``), dequantized for a bitsandbytes model."""
    layout: NodeLayout = node_layout(model)
    dequantized = {}
    if any(hasattr(getattr(m, "weight", None), "quant_state") or hasattr(getattr(m, "weight", None), "SCB")
           for m in model.modules()):
        from mansu.quantize.quantizer import dequantized_state

        dequantized = dequantized_state(model)
    out = {}
    for layer in range(layout.n_layers):
        for kind, relative in ((HEADS, layout.structure.head_out),
                               (NEURONS, layout.structure.neuron_out)):
            if keys is not None and (kind, layer) not in keys:
                continue
            name = layout.module_name(layer, relative) + ".weight"
            weight = dequantized.get(name)
            if weight is None:
                weight = model.get_parameter(name).detach()
                weight = weight.T if layout.structure.conv1d else weight
            out[kind, layer] = weight.float()
    return out


def _frozen_score(gradient: Tensor, diff: Tensor, projection: Tensor) -> Tensor:
    """[B, width]: Σ_pos diff · (W_out^T g) per unit, i.e. <g, W_out,unit diff> summed."""
    return ((gradient.to(diff.device).float() @ projection) * diff).sum(1).cpu()


def _add_nodes(heads: Tensor, neurons: Tensor, key: tuple, items: Tensor, neuron_block: int,
               layout: NodeLayout, per_unit: Tensor) -> None:
    """Add [B, width] per-unit values into the per-item node tensors, by item."""
    kind, layer = key
    if kind == HEADS:
        heads[:, layer].index_add_(0, items, per_unit.view(-1, layout.n_heads, layout.head_dim).sum(-1))
    else:
        neurons[:, layer].index_add_(0, items, block_sum(per_unit, neuron_block))


def _direct_effect(diff: Tensor, batch: Batch, readout: Tensor, projection: Tensor) -> Tensor:
    """[B, width]: per row and unit, Σ_entries weight · readout[token] · W_out[:, unit] · diff at
    the entry's position."""
    positions = batch.keep.nonzero()  # kept logits come row-major, as batch.entry_logit indexes
    at_entry = diff[positions[batch.entry_logit, 0], positions[batch.entry_logit, 1]]  # [E, width]
    read = (readout[batch.entry_tok] * batch.entry_weight[:, None]) @ projection  # [E, width]
    return torch.zeros(diff.shape[0], diff.shape[-1], device=diff.device).index_add_(
        0, batch.entry_row, read * at_entry)
