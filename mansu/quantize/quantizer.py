"""Post-training quantization Q(.) with real bitsandbytes layers, and the project's reference NF4.

``quantize_model`` swaps every ``nn.Linear`` of a deep copy for a bitsandbytes layer, quantized from
the weight tensor as stored (a bf16 model is quantized from its bf16 weights, as bitsandbytes does
when it loads one). The reference functions (``nf4_codes``, ``reference_nf4``, ...) reproduce
bitsandbytes 0.50.2's CPU rounding bit for bit in plain torch, so the diagnostics can read code
indices and in-bin positions that bitsandbytes does not expose.

bitsandbytes facts this module relies on (checked against the installed 0.50.2 source):
- The CPU ``quantize_4bit`` kernel scales full blocks by ``w * (1/absmax)`` but the partial last
  block by ``w / absmax``, clamps to [-1, 1] and rounds with ``torch.bucketize`` on the float32
  midpoints of the sorted code values. ``bucketize`` puts a value lying exactly on a midpoint into
  the LOWER code (toward -1); nearest-value argmin differs on such ties. The CUDA kernel (checked
  on an H200) gives the same codes and absmax on 5e7 random values in fp32/bf16/fp16, but sends
  exact ties on 3 of the 15 midpoints (m0, m12, m14) up; its FP4 differs from the CPU's on up to
  0.03% of bf16 values. The reference is the CPU rounding.
- ``Linear4bit`` defaults to fp4 and to double quantization (``compress_statistics=True``): both are
  always passed explicitly here.
- On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight at the first no-grad eval forward and
  rounds absmax to bf16, after which it computes with different weights. ``quantize_model`` turns
  that off so results do not depend on the CPU.
- ``Linear8bitLt`` works on CPU. It rounds the weight to fp16, then to int8 per output row
  (LLM.int8 vector-wise, no outlier threshold here). In eval mode its forward also quantizes the
  activations (int8 x int8); in train mode on CPU it multiplies by the dequantized weight instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import bitsandbytes.functional as bnb_functional
import torch
from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from torch import Tensor, nn

QUANT_TYPES = ("nf4", "fp4", "int8", "none")

# bitsandbytes' NF4 table (QLoRA), already sorted: the code index is the position in this table.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# Decision boundaries, computed in float32 as bitsandbytes computes them (bit-exactness needs it).
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

# bitsandbytes' FP4 values (1 sign, 2 exponent, 1 mantissa bit, normalised by 12), sorted. It holds
# both +0 and -0, so its sorted index is not bitsandbytes' stored code; only the values matter here.
FP4_VALUES = (
    (torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12)
    .sort()
    .values
)
_FP4_MIDPOINTS = (FP4_VALUES[:-1] + FP4_VALUES[1:]) / 2


# ---------------------------------------------------------------------------------------------
# Reference 4-bit rounding (pure torch)


def normalized_blocks(w: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Flattened ``w`` divided by its block absmax and clamped to [-1, 1], as bitsandbytes does.

    Returns ``(x: float32 [numel], absmax: float32 [n_blocks])``; the last block may be partial.
    """
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # The clamp only guards all-zero blocks (their stored absmax stays 0, as in bitsandbytes).
    x = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        # bitsandbytes divides (rather than multiplies by the reciprocal) in the partial block and
        # stores its clamped absmax; the two differ in the last bit for some values.
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        x = torch.cat([x, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return x, absmax


def expand_blocks(absmax: Tensor, numel: int, blocksize: int = 64) -> Tensor:
    """Per-element block absmax: ``absmax[i // blocksize]`` for each flat index i < numel."""
    return absmax.repeat_interleave(blocksize)[:numel]


def nf4_codes(w: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """NF4 code index (uint8 [numel], 0..15) of each element of flattened ``w``, and block absmax."""
    x, absmax = normalized_blocks(w, blocksize)
    return torch.bucketize(x, NF4_MIDPOINTS.to(x.device)).to(torch.uint8), absmax


def nf4_dequantize(
    codes: Tensor,
    absmax: Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
) -> Tensor:
    """Code value times block absmax, in float32 and then cast to ``dtype`` (as bitsandbytes)."""
    values = NF4_CODE.to(codes.device)[codes.long()] * expand_blocks(
        absmax, codes.numel(), blocksize
    )
    return values.to(dtype).reshape(shape)


def reference_nf4(w: Tensor, blocksize: int = 64, dtype: torch.dtype = torch.float32) -> Tensor:
    """Q(w) for NF4 without bitsandbytes: bit-identical to its quantize + dequantize on CPU."""
    codes, absmax = nf4_codes(w, blocksize)
    return nf4_dequantize(codes, absmax, w.shape, dtype, blocksize)


def reference_fp4(w: Tensor, blocksize: int = 64, dtype: torch.dtype = torch.float32) -> Tensor:
    """Q(w) for bitsandbytes' FP4, same rounding rule as NF4 on the FP4 value table."""
    x, absmax = normalized_blocks(w, blocksize)
    values = FP4_VALUES.to(x.device)[torch.bucketize(x, _FP4_MIDPOINTS.to(x.device))]
    return (values * expand_blocks(absmax, x.numel(), blocksize)).to(dtype).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Real bitsandbytes quantization


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def quantize_tensor(w: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> Tensor:
    """Q(w) of one tensor through bitsandbytes' functional API, dequantized to float32.

    nf4/fp4: ``quantize_4bit`` (no double quant) + ``dequantize_4bit``. int8: ``int8_vectorwise_quant``
    of the fp16-rounded tensor (per-row absmax, as ``Linear8bitLt``) + ``int8_vectorwise_dequant``;
    ``blocksize`` does not apply to it. ``none`` returns ``w`` as float32.
    """
    _check_quant_type(quant_type)
    w = w.detach()
    if quant_type == "none":
        return w.float()
    if quant_type == "int8":
        rows = w.reshape(-1, w.shape[-1]).to(torch.float16)
        int8_rows, row_absmax, _ = bnb_functional.int8_vectorwise_quant(rows)
        return bnb_functional.int8_vectorwise_dequant(int8_rows, row_absmax).reshape(w.shape)
    packed, state = bnb_functional.quantize_4bit(
        w.contiguous(), blocksize=blocksize, compress_statistics=False, quant_type=quant_type
    )
    return _dequantize_4bit_float32(packed, state).reshape(w.shape)


def _dequantize_4bit_float32(packed: Tensor, state: bnb_functional.QuantState) -> Tensor:
    # Dequantizing to float32 keeps code * absmax exact; the state's own dtype is the layer's.
    # Blocks run over the flattened tensor, and bitsandbytes 0.50.2's CPU kernel gets 2-D shapes
    # wrong when the last dimension is not a multiple of the blocksize: dequantize flat, reshape.
    float32_state = copy.copy(state)
    float32_state.dtype = torch.float32
    float32_state.shape = torch.Size([state.shape.numel()])
    return bnb_functional.dequantize_4bit(packed, float32_state).reshape(state.shape)


def quantized_linears(model: nn.Module, skip_modules: Sequence[str] = ("lm_head",)
                      ) -> dict[str, nn.Linear]:
    """module name -> nn.Linear for every layer that quantize_model stores in 4 or 8 bits: the one
    rule every stage that must agree with the quantizer uses (MANSU's mask, the saliency cut,
    qat_nf4's fake quantization). A module is skipped when its name equals an entry of
    ``skip_modules`` or ends with "." + entry: "lm_head" skips "model.lm_head", while "proj" does
    not skip "q_proj" (substring matching would)."""
    skip = tuple(skip_modules)  # a Hydra ListConfig arrives here too
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and not any(name == s or name.endswith("." + s) for s in skip)}


def _bnb_linear(
    linear: nn.Linear, quant_type: str, blocksize: int, double_quant: bool
) -> nn.Module:
    """A bitsandbytes layer quantized from ``linear``'s stored weight; shares its bias."""
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    # Built on the meta device so that nn.Linear's random init costs nothing; weight replaced below.
    if quant_type == "int8":
        layer = Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
        # Int8Params.to(<cpu or cuda>) is where bitsandbytes quantizes.
        layer.weight = Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(
            weight.device
        )
    else:
        layer = Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
        layer.weight = Params4bit(
            weight,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=torch.uint8,
            module=layer,
        ).to(weight.device)
        layer.support_avx512bf16_for_cpu = False  # the repack trap (module docstring)
    if has_bias:
        layer.bias = linear.bias
    return layer.train(linear.training)


def quantize_model(
    model: nn.Module,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    skip_modules: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """A deep copy of ``model`` whose ``nn.Linear`` layers are real bitsandbytes layers.

    nf4/fp4 -> ``Linear4bit``, int8 -> ``Linear8bitLt``, none -> an unquantized copy. Linears whose
    module name equals an entry of ``skip_modules`` or ends with "." + entry are left as they are;
    embeddings are not Linear and are never touched. ``model`` itself is not modified.
    """
    _check_quant_type(quant_type)
    skip_modules = tuple(skip_modules)  # a Hydra ListConfig arrives here too
    quantized = copy.deepcopy(model)
    if quant_type == "none":
        return quantized
    targets = list(quantized_linears(quantized, skip_modules))
    if not targets:
        raise ValueError(
            f"no quantizable layer: {type(model).__name__} has no nn.Linear outside "
            f"skip_modules={skip_modules}"
        )
    _refuse_miscomputed_shapes(quantized, targets, quant_type, blocksize)
    _refuse_non_finite(quantized, targets)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = quantized.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        setattr(parent, child_name, _bnb_linear(linear, quant_type, blocksize, double_quant))
    return quantized


def _refuse_non_finite(model: nn.Module, targets: list[str]) -> None:
    """A NaN or ±inf weight would silently turn its whole block's absmax, hence every weight of the
    block, into NaN/inf; refuse it by name instead."""
    for name in targets:
        weight = model.get_submodule(name).weight.detach()
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(f"{name}.weight holds {bad} NaN/inf value(s): refusing to quantize it")


def _refuse_miscomputed_shapes(model: nn.Module, targets: list[str], quant_type: str,
                               blocksize: int) -> None:
    """bitsandbytes 0.50.2 on CPU computes a Linear4bit wrongly when in_features is not a multiple
    of the blocksize (its dequantization misplaces blocks of 2-D weights; measured in
    tests/quantize/test_quantization.py). Real models' widths are multiples of 64; refuse the rest on CPU
    rather than report numbers from a miscomputed model."""
    if quant_type not in ("nf4", "fp4"):
        return
    bad = [name for name in targets
           if model.get_submodule(name).in_features % blocksize
           and model.get_submodule(name).weight.device.type == "cpu"]
    if bad:
        raise ValueError(
            f"bitsandbytes' CPU 4-bit layers miscompute Linear layers whose in_features is not a "
            f"multiple of blocksize={blocksize}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            f"; use widths that are multiples of {blocksize}, list them in skip_modules, or run on "
            f"a GPU")


def dequantized_state(qmodel: nn.Module) -> dict[str, Tensor]:
    """Float32 dequantized weight of every bitsandbytes layer, keyed like the original parameter.

    The keys ("model.layers.0.self_attn.q_proj.weight", ...) are the state-dict names of the
    weights in the unquantized model. The forward pass multiplies by these values cast to its
    compute dtype (the input's dtype).
    """
    state = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, Linear4bit):
            quant_state = module.weight.quant_state
            if getattr(quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(
                    f"{name} was repacked for AVX512-BF16 and its weights changed; "
                    "quantize with quantize_model, which disables that repacking"
                )
            state[f"{name}.weight"] = _dequantize_4bit_float32(module.weight.data, quant_state)
        elif isinstance(module, Linear8bitLt):
            # The first forward moves the int8 weight and its scales from the parameter to .state.
            row_absmax = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            state[f"{name}.weight"] = bnb_functional.int8_vectorwise_dequant(
                module.weight.data, row_absmax
            )
    return state


def materialize_4bit(qmodel: nn.Module) -> dict[str, Tensor]:
    """Dequantize every CPU ``Linear4bit`` of ``qmodel`` once, in place: each becomes an
    ``nn.Linear`` holding its dequantized weight in the layer's own dtype. Returns
    ``dequantized_state(qmodel)`` as it was before the swap (float32), for the analyses to reuse.

    bitsandbytes 0.50.2's CPU ``Linear4bit`` (without the AVX512-BF16 repack, which
    ``quantize_model`` turns off) computes ``F.linear(x, dequantize_4bit(W, dtype=x.dtype), bias)``
    at every call, i.e. it dequantizes all its weights for every batch; the swap gives bit-identical
    outputs (tests/quantize/test_quantization.py) at the cost of an unquantized forward. GPU layers and
    int8 layers (whose forward also quantizes the activations) are left as they are.
    """
    state = dequantized_state(qmodel)
    for name, module in list(qmodel.named_modules()):
        if not isinstance(module, Linear4bit) or module.weight.device.type != "cpu":
            continue
        dtype = module.weight.quant_state.dtype
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta", dtype=dtype)
        linear.weight = nn.Parameter(state[f"{name}.weight"].to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(qmodel.get_submodule(parent_name), child_name, linear.train(module.training))
    return state
