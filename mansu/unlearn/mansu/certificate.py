"""The floor's certificate (docs/method.md §4.5): quantize θ0 and θu of every masked weight with
bitsandbytes itself and count, over the floored entries, how many changed code and how many are
exact fixed points of Q; a failed certificate is said in the record and the log."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import bitsandbytes.functional as bnb_functional
import torch
from torch import Tensor

from mansu.unlearn.mansu.mask import MaskedWeight

log = logging.getLogger(__name__)


def bnb_nf4(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """bitsandbytes' NF4 of ``weight`` as stored: (code per element, block absmax, dequantized
    values in the weight's dtype), all flat. Codes are packed two per byte, high nibble first.
    The tensor is handed over flattened: the codes do not depend on the shape, but bitsandbytes
    0.50.2's CPU dequantize kernel is wrong for 2-D shapes whose last dimension is not a multiple
    of the blocksize (e.g. 867 of 1024 values of a 32 x 32 weight)."""
    packed, state = bnb_functional.quantize_4bit(weight.detach().reshape(-1).contiguous(),
                                                 blocksize=blocksize, compress_statistics=False,
                                                 quant_type="nf4")
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: weight.numel()]
    return codes, state.absmax, bnb_functional.dequantize_4bit(packed, state).reshape(-1)


def nf4_certificate(masked: Sequence[MaskedWeight], certified: Sequence[Tensor],
                    blocksize: int) -> dict:
    """Quantize θ0 and θu of every masked weight with bitsandbytes and report, over the certified
    entries (the floored ones, or the moved ones without a floor), the share whose NF4 code
    differs from Q(θ0)'s and the share that are exact fixed points of Q in the stored dtype, plus
    how many blocks changed scale (the floor never changes one)."""
    n = flipped = fixed = rescaled = 0
    for m, chosen in zip(masked, certified):
        after = m.param.detach()
        before = after.clone()
        before.view(-1)[m.index] = m.theta0
        codes0, absmax0, _ = bnb_nf4(before, blocksize)
        codes, absmax, dequantized = bnb_nf4(after, blocksize)
        positions = m.index[chosen]
        n += positions.numel()
        flipped += int((codes[positions] != codes0[positions]).sum())
        fixed += int((dequantized[positions] == after.reshape(-1)[positions]).sum())
        rescaled += int((absmax != absmax0).sum())
    return {"entries": n, "code_flip_share": flipped / n if n else None,
            "fixed_point_share": fixed / n if n else None, "blocks_rescaled": rescaled}


def flag_failed_certificate(certificate: dict) -> None:
    """Say it in the record and the log when a floored weight kept its code or a block changed
    scale: the floor's guarantee did not hold for this run."""
    if certificate["entries"] and (certificate["code_flip_share"] < 1.0
                                   or certificate["blocks_rescaled"]):
        message = (f"NF4 CERTIFICATE FAILED: only {certificate['code_flip_share']:.6f} of the "
                   f"{certificate['entries']} floored weights changed their bitsandbytes code "
                   f"and {certificate['blocks_rescaled']} blocks changed scale; quantization may "
                   "undo part of this unlearning")
        certificate["warning"] = message
        log.error(message)


