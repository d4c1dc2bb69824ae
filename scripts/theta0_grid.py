"""What SmolLM2's Q4_1 grid does to NF4: θ0 (a dequantized Q4_1 GGUF) against the same tensors
made continuous again (each weight moved by uniform noise of one Q4_1 step of its 32-weight block),
side by side, on every Linear layer NF4 quantizes.

Printed: distinct values per 64-weight NF4 block (Q4_1 allows at most 32), NF4's relative error
RMS ||Q(w) − w|| / ||w|| (mean over layers), and the share of weights within 1% of the narrowest
NF4 bin of a code boundary (where a small update flips the code), for θ0 and the continuous copy.

Usage: python scripts/theta0_grid.py [hydra overrides]    (default: experiment=smollm2_cpu)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mansu.quantize.quantizer import (  # noqa: E402
    NF4_MIDPOINTS,
    normalized_blocks,
    quantized_linears,
    reference_nf4,
)
from mansu.run import load, make_context  # noqa: E402


def q4_1_steps(w: torch.Tensor) -> torch.Tensor:
    """Each weight's Q4_1 step: the smallest gap between distinct values of its 32-weight block."""
    blocks = w.float().reshape(-1, 32)
    steps = []
    for block in blocks:
        values = torch.unique(block)
        gaps = values[1:] - values[:-1]
        steps.append(gaps.min() if gaps.numel() else torch.tensor(0.0))
    return torch.stack(steps).repeat_interleave(32).reshape(w.shape)


def stats(w: torch.Tensor) -> dict:
    x, _ = normalized_blocks(w, 64)
    distinct = torch.tensor([torch.unique(b).numel() for b in w.reshape(-1, 64)]).float()
    mids = NF4_MIDPOINTS.to(x.dtype)
    widths = torch.diff(torch.cat([torch.tensor([-1.0]), mids, torch.tensor([1.0])]))
    nearest = (x.reshape(-1, 1) - mids).abs().min(dim=1).values
    q = reference_nf4(w, 64)
    return {"distinct": distinct, "error": (q - w).norm() / w.norm(),
            "near": (nearest < 0.01 * widths.min()).float().mean()}


def main(argv: list[str]) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smollm2_cpu", "benchmark.mmlu_size=0",
                                           *argv])
    ctx = make_context(cfg, Path("/tmp"))
    _, model, _ = load(cfg, ctx)
    generator = torch.Generator().manual_seed(0)
    rows = {"θ0 (Q4_1 grid)": [], "θ0 + U(±½ Q4_1 step)": []}
    for linear in quantized_linears(model).values():
        w = linear.weight.detach().float().cpu()
        noise = (torch.rand(w.shape, generator=generator) - 0.5) * q4_1_steps(w)
        rows["θ0 (Q4_1 grid)"].append(stats(w))
        rows["θ0 + U(±½ Q4_1 step)"].append(stats(w + noise))
    print("| weights | distinct values / 64-block (mean, max) | NF4 relative error RMS | "
          "share within 1% of the narrowest bin of a code boundary |")
    print("|---|---|---|---|")
    for label, per_layer in rows.items():
        distinct = torch.cat([s["distinct"] for s in per_layer])
        error = torch.stack([s["error"] for s in per_layer]).mean()
        near = torch.stack([s["near"] for s in per_layer]).mean()
        print(f"| {label} | {distinct.mean():.1f}, {distinct.max():.0f} | {error:.4f} | "
              f"{near:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
