"""A frozen reference copy of θ0 (NPO, KL, RMU), sharded like the model when it is."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mansu.unlearn.optimizers import is_sharded


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference copy of θ0 for NPO/KL/RMU: eval mode, no grads; call it under no_grad.
    An FSDP-sharded model gets a reference sharded the same way (FSDP forbids deepcopy)."""
    if is_sharded(list(model.parameters())):
        return sharded_frozen_copy(model)
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def sharded_frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of an FSDP2-sharded model, sharded the same way (each rank copies its own
    shards; FSDP forbids deepcopy)."""
    device = next(model.parameters()).device
    reference = _sharded_skeleton(model, device)
    with torch.no_grad():
        for mine, theirs in zip(reference.parameters(), model.parameters()):
            mine.to_local().copy_(theirs.to_local())
    _copy_buffers(reference, {n: b for n, b in model.named_buffers()})
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _sharded_skeleton(model: nn.Module, device: torch.device) -> nn.Module:
    """An empty copy of `model` built on the meta device, every decoder layer and the root
    fully_shard-ed, then allocated (uninitialized) on `device`."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    layer_classes = set(getattr(skeleton, "_no_split_modules", None) or ())
    for module in skeleton.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(skeleton)
    skeleton.to_empty(device=device)
    return skeleton


def _copy_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the state dict: copy them over."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name].to(buffer.device))
