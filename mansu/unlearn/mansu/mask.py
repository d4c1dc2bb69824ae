"""Which weights MANSU may change (docs/method.md §4.1): the circuit's entries in the quantized Linear
weights, less every block-absmax element, as flat index lists (``MaskedWeight``), and the tools
that keep gradients and optimizer state at that size.

Only weights of the Linear layers ``quantize_model`` quantizes (every ``nn.Linear`` outside
``skip_modules``) are in the mask: biases, norms, embeddings and lm_head stay at θ0, since
bitsandbytes keeps them in full precision and a floor means nothing there. Every element whose
|w| equals its block's absmax (ties included) is left out: moving it would rescale its block and
change other weights' codes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from mansu.attribution.circuit import Circuit, parameter_mask
from mansu.quantize.quantizer import NF4_MIDPOINTS, expand_blocks, normalized_blocks, quantized_linears
from mansu.unlearn.checks import require

CIRCUITS = ("attributed", "random", "full")


def quantizable_linears(model: nn.Module, skip_modules: tuple[str, ...] = ("lm_head",)
                        ) -> dict[str, nn.Linear]:
    """weight name -> its nn.Linear, for every layer quantize_model would quantize."""
    return {f"{name}.weight": module for name, module in quantized_linears(model, skip_modules).items()}


def random_circuit(reference: Circuit, seed: int, model: nn.Module) -> Circuit:
    """As many heads and neuron blocks as ``reference``, placed uniformly at random; a circuit
    that carries its own weights gets as many weights of each tensor, at random positions."""
    generator = torch.Generator().manual_seed(seed)

    def scatter(selected: Tensor) -> Tensor:
        chosen = torch.zeros(selected.numel(), dtype=torch.bool)
        chosen[torch.randperm(selected.numel(), generator=generator)[: int(selected.sum())]] = True
        return chosen.view(selected.shape)

    weights = None
    if reference.weights is not None:
        params = dict(model.named_parameters())
        weights = {name: torch.randperm(params[name].numel(), generator=generator)[
            :index.numel()].sort().values for name, index in reference.weights.items()}
    return replace(reference, heads=scatter(reference.heads), neurons=scatter(reference.neurons),
                   weights=weights)


@dataclass
class MaskedWeight:
    """The masked entries of one quantized Linear weight, and where they sit in NF4 at θ0.

    ``index``: flat positions in the weight; ``theta0``: their stored values at θ0; ``scale``:
    their block's absmax (float32); ``code0``: their NF4 code at θ0. ``index_floored`` is set by
    the floor (a bool per entry)."""

    name: str
    module: nn.Linear
    index: Tensor
    theta0: Tensor
    scale: Tensor
    code0: Tensor
    index_floored: Tensor | None = None

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight

    def current(self) -> Tensor:
        return self.param.detach().reshape(-1)[self.index]

    def write(self, values: Tensor) -> None:
        self.param.data.view(-1)[self.index] = values.to(self.param.dtype)

    def moved(self) -> Tensor:
        return self.current() != self.theta0

    def subset(self, keep: Tensor) -> MaskedWeight:
        return replace(self, index=self.index[keep], theta0=self.theta0[keep],
                       scale=self.scale[keep], code0=self.code0[keep])


def build_mask(model: nn.Module, linears: dict[str, nn.Linear], circuit: Circuit | None,
               blocksize: int, chunk_blocks: int = 1 << 14) -> tuple[list[MaskedWeight], dict]:
    """The circuit's entries in the quantized weights (all of them for circuit=None), less every
    block-absmax element; and the counts at each cut. Weights are read ``chunk_blocks`` NF4 blocks
    at a time, so the float copies this needs stay small next to a large weight."""
    owned = parameter_mask(model, circuit) if circuit is not None else None
    info = {"circuit_entries": (sum(int(m.sum()) for m in owned.values()) if owned is not None
                                else sum(linear.weight.numel() for linear in linears.values())),
            "quantizable_entries": 0, "absmax_excluded": 0}
    masked = []
    for name, linear in linears.items():
        if owned is not None and name not in owned:
            continue
        flat = linear.weight.detach().reshape(-1)
        parts = []
        step = chunk_blocks * blocksize  # whole blocks, so each chunk rounds as the whole does
        for start in range(0, flat.numel(), step):
            values = flat[start:start + step]
            entries = (torch.ones_like(values, dtype=torch.bool) if owned is None
                       else owned[name].reshape(-1)[start:start + step].to(values.device))
            x, absmax = normalized_blocks(values, blocksize)
            scale = expand_blocks(absmax, x.numel(), blocksize)
            holders = entries & (values.float().abs() == scale)
            info["quantizable_entries"] += int(entries.sum())
            info["absmax_excluded"] += int(holders.sum())
            index = (entries & ~holders).nonzero()[:, 0]
            codes = torch.bucketize(x[index], NF4_MIDPOINTS.to(x.device))
            parts.append((index + start, values[index].clone(), scale[index], codes))
        index, theta0, scale, codes = (torch.cat(column) for column in zip(*parts))
        if index.numel():
            masked.append(MaskedWeight(name, linear, index, theta0, scale, codes.to(torch.uint8)))
    info["entries"] = sum(m.index.numel() for m in masked)
    require(bool(masked), f"mansu: the mask is empty: {_describe_empty(info)}")
    return masked, info


def _describe_empty(info: dict) -> str:
    if info["circuit_entries"] == 0:
        return "the circuit holds no node (its parameter mask has no entry)"
    if info["quantizable_entries"] == 0:
        return (f"none of the circuit's {info['circuit_entries']} parameters is a weight of a "
                "quantized Linear layer")
    return (f"all {info['quantizable_entries']} of the circuit's quantized weights hold their "
            "block's absmax, which the floor must not move")


def restrict(masked: Sequence[MaskedWeight], keep: Tensor) -> list[MaskedWeight]:
    """The entries where ``keep`` (flat, in mask order) is True; weights left empty are dropped."""
    kept = []
    for m, part in zip(masked, keep.split([m.index.numel() for m in masked])):
        if part.any():
            kept.append(m if bool(part.all()) else m.subset(part))
    return kept


def flat_values(masked: Sequence[MaskedWeight]) -> tuple[Tensor, Tensor]:
    """(θ0, current) over every masked entry, in mask order, as float32."""
    return (torch.cat([m.theta0.float() for m in masked]),
            torch.cat([m.current().float() for m in masked]))


def write_flat(masked: Sequence[MaskedWeight], values: Tensor) -> None:
    for m, part in zip(masked, values.split([m.index.numel() for m in masked])):
        m.write(part)


@contextmanager
def only_trainable(model: nn.Module, params: Sequence[nn.Parameter]):
    """Only ``params`` require grad inside: backward computes no other weight gradient."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextmanager
def gathered_gradients(masked: Sequence[MaskedWeight]) -> Iterator[list[Tensor | None]]:
    """Collect each weight's gradient on its masked entries as backward produces it and free the
    full-size gradient at once, so at most one weight's dense gradient exists at a time. The
    yielded list holds, after backward, one flat tensor per masked weight (None if unreached)."""
    parts: list[Tensor | None] = [None] * len(masked)
    handles = []
    for i, m in enumerate(masked):
        def hook(param: Tensor, i: int = i, index: Tensor = m.index) -> None:
            gathered = param.grad.reshape(-1)[index]
            parts[i] = gathered if parts[i] is None else parts[i] + gathered
            param.grad = None

        handles.append(m.param.register_post_accumulate_grad_hook(hook))
    try:
        yield parts
    finally:
        for handle in handles:
            handle.remove()


def masked_gradient(masked: Sequence[MaskedWeight], loss: Tensor) -> Tensor:
    """d loss / d (masked entries), flat in mask order (zeros where the loss does not reach)."""
    with gathered_gradients(masked) as parts:
        loss.backward()
    return torch.cat([part.float() if part is not None
                      else torch.zeros(m.index.numel(), device=m.index.device)
                      for part, m in zip(parts, masked)])
