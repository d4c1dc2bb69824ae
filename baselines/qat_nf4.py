"""Straight-through quantization-aware unlearning (the SAF method of "DurableUn", arXiv 2605.02196):
the forget and retain losses are those of Q(θ), the model with every quantized Linear weight
replaced by its bitsandbytes NF4 value, and the gradient passes the rounding as the identity
(straight-through estimator), so the fp weights θ are trained for what NF4 will make of them.

L = F(Q(θ)) + alpha·NLL_retain(Q(θ)), F = −NLL(forget) (``ga``) or NPO against Q(θ0) (``npo``,
frozen, so its step-1 log-ratio is 0). Q is mansu.quantize.quantizer.reference_nf4 (bit for bit
bitsandbytes' CPU quantize + dequantize, from the weight as stored: bf16 weights are quantized from
bf16), with the quantizer's blocksize and skip_modules; Q(θ) is computed once per step and shared
by the forget and retain forwards. Parameters are stepped in ``ctx.storage`` like every baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from mansu.quantize.quantizer import quantized_linears, reference_nf4
from mansu.unlearn.checks import UnlearnResult, require
from mansu.unlearn.likelihood import mean_nll, sequence_logprobs
from mansu.unlearn.losses import ga_loss, npo_loss
from mansu.unlearn.reference import frozen_copy
from mansu.unlearn.scaffold import Training, baseline


@baseline("qat_nf4")
def unlearn(training: Training, *, forget_loss: Literal["ga", "npo"] = "ga", beta: float = 0.1,
            retain_loss: Literal["none", "nll"] = "nll", alpha: float = 1.0,
            blocksize: int = 64, skip_modules: tuple[str, ...] = ("lm_head",)) -> UnlearnResult:
    require(forget_loss in ("ga", "npo"),
            f"qat_nf4: forget_loss must be 'ga' or 'npo', got {forget_loss!r}")
    require(retain_loss in ("none", "nll"),
            f"qat_nf4: retain_loss must be 'none' or 'nll', got {retain_loss!r}")
    require(beta > 0, f"qat_nf4: beta must be > 0, got {beta}")
    require(alpha >= 0, f"qat_nf4: alpha must be >= 0, got {alpha}")
    require(blocksize >= 2, f"qat_nf4: blocksize must be >= 2, got {blocksize}")
    require(retain_loss == "none" or len(training.retain.corpus) > 0,
            f"qat_nf4: retain_loss={retain_loss!r} needs a retain corpus, and it is empty")
    model = training.model
    names = quantized_weight_names(model, tuple(skip_modules))
    reference = None
    if forget_loss == "npo":
        with torch.no_grad():
            reference = QuantizedForward(frozen_copy(model), names, blocksize)

    def loss(forget, retain):
        quantized = QuantizedForward(model, names, blocksize)
        if reference is None:
            value = ga_loss(mean_nll(quantized, forget))
        else:
            with torch.no_grad():
                logp_ref = sequence_logprobs(reference, forget)
            value = npo_loss(sequence_logprobs(quantized, forget), logp_ref, beta)
        if retain is not None:
            value = value + alpha * mean_nll(quantized, retain)
        return value

    return training.train(loss, retain=retain_loss == "nll",
                          info={"fake_quantized_tensors": len(names), "blocksize": blocksize})


class _StraightThroughNF4(torch.autograd.Function):
    """Forward: bitsandbytes' NF4 quantize + dequantize of the weight as stored, in its dtype.
    Backward: the identity, since the rounding's true derivative is zero almost everywhere."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, blocksize: int) -> torch.Tensor:
        return reference_nf4(weight, blocksize, dtype=weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_nf4(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Q(weight) in the forward, identity gradient (straight-through)."""
    return _StraightThroughNF4.apply(weight, blocksize)


def quantized_weight_names(model: nn.Module, skip_modules: Sequence[str]) -> list[str]:
    """The weights quantize_model turns into NF4: every nn.Linear outside skip_modules."""
    names = [f"{name}.weight" for name in quantized_linears(model, skip_modules)]
    require(len(names) > 0, f"qat_nf4: {type(model).__name__} has no nn.Linear outside "
                            f"skip_modules={list(skip_modules)}; nothing to fake-quantize")
    return names


class QuantizedForward:
    """Calls `model` with the named weights replaced by fake_nf4 of their current values, which
    are computed once, here; gradients reach the model's own parameters through the STE."""

    def __init__(self, model: nn.Module, names: Sequence[str], blocksize: int):
        self.model = model
        params = dict(model.named_parameters())
        self.weights = {name: fake_nf4(params[name], blocksize) for name in names}

    def __call__(self, **inputs):
        return functional_call(self.model, self.weights, args=(), kwargs=inputs)
