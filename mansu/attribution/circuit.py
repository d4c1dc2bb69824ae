"""The circuit: selected nodes, and the parameter entries they own (docs/method.md §3), or, when a
selection rule cut it further (``mansu.attribution.selection.necessity``), its own per-weight set."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mansu.attribution.nodes import node_layout


@dataclass
class Circuit:
    """Selected nodes: ``heads`` [L, H] and ``neurons`` [L, n_blocks] boolean. ``curve`` lists
    every (size, faithfulness) evaluated; ``faithfulness`` is the chosen size's.

    ``weights``: param name -> flat indices (int64, CPU) of the entries to update, when the rule
    chose weights inside the nodes (``parameter_mask`` then returns exactly these); None = every
    entry the nodes own. ``report``: what the rule measured (ablation curves, stability), recorded
    as is."""

    heads: Tensor
    neurons: Tensor
    neuron_block: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    faithfulness: float = float("nan")
    threshold: float = float("nan")
    rule: str = "sufficiency"
    weights: dict[str, Tensor] | None = None
    report: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.heads.sum() + self.neurons.sum())

    def flat(self) -> Tensor:
        return torch.cat([self.heads.flatten(), self.neurons.flatten()])

    def nodes(self) -> list[tuple[str, int, int]]:
        """("head", layer, head) and ("neurons", layer, block) of every selected node."""
        return ([("head", int(layer), int(h)) for layer, h in self.heads.nonzero()]
                + [("neurons", int(layer), int(b)) for layer, b in self.neurons.nonzero()])

    def to_json(self) -> dict:
        return {"size": self.size, "n_heads": int(self.heads.sum()),
                "n_neuron_blocks": int(self.neurons.sum()), "neuron_block": self.neuron_block,
                "faithfulness": self.faithfulness,
                "threshold": None if math.isnan(self.threshold) else self.threshold,
                "curve": [[s, f] for s, f in self.curve], "rule": self.rule,
                "weight_entries": (None if self.weights is None
                                   else sum(int(i.numel()) for i in self.weights.values())),
                **self.report}


def parameter_mask(model: nn.Module, circuit: Circuit) -> dict[str, Tensor]:
    """param name -> bool tensor of its shape: the entries the circuit's nodes own.

    Head h of layer l owns its q rows, the rows of its kv head h * n_kv // n_heads in k and v, and
    its column slice of the output projection; neuron j owns row j of gate/up (fc_in) and column j
    of down (fc_out). The biases of the owned q/k/v and fc_in rows are owned too; the output
    projections' biases are shared by all nodes and are not. Conv1D (GPT-2) stores (in, out), so
    its rows and columns swap. Only parameters with at least one owned entry appear.

    A circuit that carries its own ``weights`` gets exactly those entries."""
    if circuit.weights is not None:
        return weight_mask(model, circuit.weights)
    return node_mask(model, circuit)


def weight_mask(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """param name -> bool tensor of its shape, True at the listed flat indices."""
    params = dict(model.named_parameters())
    mask = {}
    for name, index in weights.items():
        if index.numel():
            param = params[name]
            flat = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
            flat[index.to(param.device)] = True
            mask[name] = flat.view(param.shape)
    return mask


def node_mask(model: nn.Module, circuit: Circuit) -> dict[str, Tensor]:
    """The entries the circuit's nodes own (``parameter_mask`` without a per-weight set)."""
    layout = node_layout(model)
    structure = layout.structure
    out_axis, in_axis = (1, 0) if structure.conv1d else (0, 1)
    hd, group = layout.head_dim, layout.n_heads // layout.n_kv_heads
    mask: dict[str, Tensor] = {}

    def own(relative: str, layer: int, axis: int, index: Tensor, with_bias: bool) -> None:
        module = model.get_submodule(layout.module_name(layer, relative))
        params = [("weight", axis)] + ([("bias", 0)] if with_bias else [])
        for param_name, param_axis in params:
            param = getattr(module, param_name, None)
            if param is None:
                continue
            name = f"{layout.module_name(layer, relative)}.{param_name}"
            if name not in mask:
                mask[name] = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            mask[name].index_fill_(param_axis, index.to(param.device), True)

    for layer in range(layout.n_layers):
        heads = circuit.heads[layer].nonzero()[:, 0]
        if heads.numel():
            q = _unit_slices(heads, hd)
            kv = _unit_slices(heads.div(group, rounding_mode="floor").unique(), hd)
            if structure.qkv_layout == "separate":
                for relative, index in zip(structure.qkv, (q, kv, kv)):
                    own(relative, layer, out_axis, index, with_bias=True)
            elif structure.qkv_layout == "blocks":
                width = layout.n_heads * hd
                own(structure.qkv[0], layer, out_axis,
                    torch.cat([q, q + width, q + 2 * width]), with_bias=True)
            else:  # per_head: head h's q, k, v are rows [3 h hd, 3 (h + 1) hd)
                own(structure.qkv[0], layer, out_axis, _unit_slices(heads, 3 * hd),
                    with_bias=True)
            own(structure.head_out, layer, in_axis, q, with_bias=False)
        blocks = circuit.neurons[layer].nonzero()[:, 0]
        if blocks.numel():
            neurons = _unit_slices(blocks, circuit.neuron_block)
            neurons = neurons[neurons < layout.n_neurons]
            for relative in structure.neuron_in:
                own(relative, layer, out_axis, neurons, with_bias=True)
            own(structure.neuron_out, layer, in_axis, neurons, with_bias=False)
    return mask


def _unit_slices(units: Tensor, width: int) -> Tensor:
    """Indices [u * width, (u + 1) * width) of every unit u."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def mask_share(mask: dict[str, Tensor], model: nn.Module) -> float:
    """Share of all the model's parameters that the mask holds."""
    total = sum(p.numel() for p in model.parameters())
    return sum(int(m.sum()) for m in mask.values()) / total

