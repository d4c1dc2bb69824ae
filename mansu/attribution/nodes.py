"""The nodes of a decoder (attention heads and MLP neurons) and hooks that read or replace them.

Nodes are the attention heads and the MLP neurons of every layer (neurons optionally grouped into
fixed-size blocks, ``neuron_block``). A node's output z_v is read by a forward pre-hook on the
input of the layer's output projection: the head outputs are the input of o_proj / attn.c_proj /
attention.dense (reshaped to heads), the neurons the input of down_proj / mlp.c_proj /
dense_4h_to_h. The table ``_STRUCTURES`` names these modules per family; a model none of its rows
fits is refused with a message that names it. Plain torch hooks on Hugging Face models, so the same
code runs on a bitsandbytes-quantized copy (the hooks read Linear inputs, which stay real tensors,
and gradients reach them through the 4-bit matmul even though the packed weights have none).

Flat node order (every node vector and ``Attribution.flat``): heads layer-major, then neuron
blocks layer-major.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

HEADS, NEURONS = "heads", "neurons"


class UnsupportedArchitectureError(ValueError):
    """A model whose module structure matches no family in the attribution table."""


# ---------------------------------------------------------------------------------------------
# Where the nodes live, per family


@dataclass(frozen=True)
class _Structure:
    """Module names inside one decoder layer. ``qkv_layout``: ``separate`` (q_proj/k_proj/v_proj),
    ``blocks`` (fused [q | k | v] along the output, GPT-2) or ``per_head`` (fused, each head's
    [q k v] contiguous, GPT-NeoX). ``conv1d``: weights stored (in, out), GPT-2's Conv1D."""

    name: str
    layers: str
    qkv: tuple[str, ...]
    qkv_layout: str
    head_out: str
    neuron_in: tuple[str, ...]
    neuron_out: str
    conv1d: bool


_STRUCTURES = (
    _Structure("llama-style", "model.layers",
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "separate",
               "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", False),
    _Structure("gpt2", "transformer.h", ("attn.c_attn",), "blocks", "attn.c_proj",
               ("mlp.c_fc",), "mlp.c_proj", True),
    _Structure("gpt-neox", "gpt_neox.layers", ("attention.query_key_value",), "per_head",
               "attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", False),
)
SUPPORTED = "Llama, Qwen2, Qwen3, Mistral, Gemma (llama-style names), GPT-2, GPT-NeoX"


@dataclass(frozen=True)
class NodeLayout:
    family: str  # the config's model_type
    structure: _Structure
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_neurons: int
    hidden_size: int

    def module_name(self, layer: int, relative: str) -> str:
        return f"{self.structure.layers}.{layer}.{relative}"

    def n_blocks(self, neuron_block: int) -> int:
        return math.ceil(self.n_neurons / neuron_block)


def node_layout(model: nn.Module) -> NodeLayout:
    """The model's heads and neurons, found from its own module structure."""
    config = model.config
    for structure in _STRUCTURES:
        layers = find_module(model, structure.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        names = (*structure.qkv, structure.head_out, *structure.neuron_in, structure.neuron_out)
        if all(find_module(layers[0], name) is not None for name in names):
            break
    else:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', '?')!r}) is not "
            f"supported by attribution: its layers have none of the module layouts it knows "
            f"({SUPPORTED}; e.g. self_attn.o_proj + mlp.down_proj)")
    n_heads = config.num_attention_heads
    head_out = find_module(layers[0], structure.head_out)
    attn_width = _in_features(head_out)
    if attn_width % n_heads:
        raise UnsupportedArchitectureError(
            f"{structure.head_out} takes {attn_width} inputs, not a multiple of {n_heads} heads")
    return NodeLayout(
        family=getattr(config, "model_type", structure.name),
        structure=structure,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=attn_width // n_heads,
        n_neurons=_in_features(find_module(layers[0], structure.neuron_out)),
        hidden_size=config.hidden_size,
    )


def find_module(root: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        return None


def _in_features(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return module.in_features
    return module.weight.shape[0]  # transformers' Conv1D stores (in, out)


# ---------------------------------------------------------------------------------------------
# Hooks on the node outputs

# A hook body: (kind, layer, z) -> replacement z, or None to leave it.
NodeFn = Callable[[str, int, Tensor], Tensor | None]


@contextmanager
def node_hooks(model: nn.Module, layout: NodeLayout, fn: NodeFn):
    handles = []
    for layer in range(layout.n_layers):
        for kind, relative in ((HEADS, layout.structure.head_out),
                               (NEURONS, layout.structure.neuron_out)):
            module = model.get_submodule(layout.module_name(layer, relative))

            def hook(_module, args, kind=kind, layer=layer):
                replaced = fn(kind, layer, args[0])
                return None if replaced is None else (replaced, *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(store: dict) -> NodeFn:
    def fn(kind, layer, z):
        store[kind, layer] = z

    return fn


def patch_all(values: dict) -> NodeFn:
    def fn(kind, layer, z):
        return values[kind, layer].expand_as(z)

    return fn


def patch_outside(keep: dict, source: dict) -> NodeFn:
    def fn(kind, layer, z):
        return torch.where(keep[kind, layer].to(z.device), z, source[kind, layer])

    return fn


def keep_masks(nodes: Tensor, layout: NodeLayout, neuron_block: int, device) -> dict:
    """(kind, layer) -> [width] bool: the activation units that stay clean."""
    n_head_nodes = layout.n_layers * layout.n_heads
    heads = torch.zeros(n_head_nodes, dtype=torch.bool)
    blocks = torch.zeros(layout.n_layers * layout.n_blocks(neuron_block), dtype=torch.bool)
    heads[nodes[nodes < n_head_nodes]] = True
    blocks[nodes[nodes >= n_head_nodes] - n_head_nodes] = True
    heads = heads.view(layout.n_layers, -1).repeat_interleave(layout.head_dim, dim=1)
    neurons = blocks.view(layout.n_layers, -1).repeat_interleave(neuron_block, dim=1)
    keep = {}
    for layer in range(layout.n_layers):
        keep[HEADS, layer] = heads[layer].to(device)
        keep[NEURONS, layer] = neurons[layer, : layout.n_neurons].to(device)
    return keep


@contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def block_sum(scores: Tensor, block: int) -> Tensor:
    n_layers, n = scores.shape
    padded = torch.zeros(n_layers, math.ceil(n / block) * block)
    padded[:, :n] = scores
    return padded.view(n_layers, -1, block).sum(-1)

