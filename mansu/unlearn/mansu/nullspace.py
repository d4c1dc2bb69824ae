"""The null-space projection of every forget step (docs/method.md §4.2).

``nullspace: fisher`` (default) projects the flat step over the masked entries off the span of
the per-example retain gradients (the null space of the circuit-restricted empirical Fisher);
``nullspace: activation`` right-multiplies each weight's update by the projector onto the
low-eigenvalue space of its retain input covariance (AlphaEdit); ``none`` for the ablation. The
step is projected after the optimizer, so Adam's scaling cannot leave the subspace.

``nullspace: activation`` projects each weight's update on the sub-block of the rows and columns
holding masked entries; once the mask has single entries (a parameter-level circuit) the
projected step is cut back to the mask, which leaves it only approximately in the null space.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mansu.unlearn.mansu.mask import MaskedWeight
from mansu.unlearn.mansu.retain import NullspaceStatistics

NULLSPACES = ("fisher", "activation", "none")
# Eigenvalues below this share of the largest are numerical noise of a rank-deficient Gram matrix.
_RANK_TOLERANCE = 1e-10

Projector = Callable[[Tensor], Tensor]


def projector(kind: str, masked: list[MaskedWeight], stats: NullspaceStatistics, energy: float
              ) -> tuple[Projector | None, int]:
    """The projection for ``kind`` and its rank (0 for none)."""
    if kind == "fisher":
        nullspace = FisherNullspace(stats.gradients, energy)
        return nullspace, nullspace.rank
    if kind == "activation":
        nullspace = ActivationNullspace(masked, stats.covariances, energy)
        return nullspace, nullspace.rank
    return None, 0


def _top_directions(eigenvalues: Tensor, energy: float) -> int:
    """How many of the (descending) eigenvalues carry ``energy`` of their sum, noise excluded."""
    if eigenvalues.numel() == 0 or eigenvalues[0] <= 0:
        return 0
    cumulative = eigenvalues.cumsum(0)
    needed = int((cumulative < energy * cumulative[-1]).sum()) + 1
    return min(needed, int((eigenvalues > _RANK_TOLERANCE * eigenvalues[0]).sum()))


class FisherNullspace:
    """Δ ↦ Δ − U Uᵀ Δ, U the top right singular vectors of the per-example retain gradients
    G [n, d] that carry ``energy`` of their squared singular values: the null space of the
    circuit-restricted empirical Fisher. U comes from the n × n Gram matrix in float64 (n ≪ d)
    and is written over G's first rows, chunk by chunk (G is consumed: no second n × d tensor).
    The projection is applied twice, which takes the residual along U from fp32 rounding (~1e-7)
    to its square."""

    def __init__(self, gradients: Tensor, energy: float, chunk: int = 1 << 16):
        gram = torch.zeros(gradients.shape[0], gradients.shape[0], dtype=torch.float64,
                           device=gradients.device)
        for start in range(0, gradients.shape[1], chunk):
            block = gradients[:, start:start + chunk].double()
            gram += block @ block.T
        eigenvalues, vectors = torch.linalg.eigh(gram)
        eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
        self.rank = _top_directions(eigenvalues, energy)
        weights = (vectors[:, :self.rank] / eigenvalues[:self.rank].sqrt()).T
        for start in range(0, gradients.shape[1], chunk):
            columns = gradients[:, start:start + chunk]
            columns[:self.rank] = weights @ columns.double()
        self.basis = gradients[:self.rank]

    def __call__(self, delta: Tensor) -> Tensor:
        for _ in range(2):
            delta = delta - self.basis.T @ (self.basis @ delta)
        return delta


class ActivationNullspace:
    """AlphaEdit-style: each weight's update ΔW (on the rows I × columns J holding masked entries)
    becomes ΔW P, P the projector onto the eigenvectors of that layer's retain input covariance
    (columns J) outside those carrying ``energy`` of its trace, so ΔW x ≈ 0 for retain inputs."""

    def __init__(self, masked: list[MaskedWeight], covariances: dict, energy: float):
        self.parts = []
        self.rank = 0
        for m in masked:
            in_features = m.module.in_features
            rows, row_pos = (m.index // in_features).unique(return_inverse=True)
            cols, col_pos = (m.index % in_features).unique(return_inverse=True)
            collected, cov = covariances[m.name]
            where = torch.searchsorted(collected, cols)
            eigenvalues, vectors = torch.linalg.eigh(cov[where][:, where])
            eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
            k = _top_directions(eigenvalues, energy)
            self.rank += k
            self.parts.append((len(rows), len(cols), row_pos, col_pos, vectors[:, :k].float()))

    def __call__(self, delta: Tensor) -> Tensor:
        out = []
        for (n_rows, n_cols, row_pos, col_pos, high), part in zip(
                self.parts, delta.split([len(p[2]) for p in self.parts])):
            block = torch.zeros(n_rows, n_cols, dtype=delta.dtype, device=delta.device)
            block[row_pos, col_pos] = part
            block = block - (block @ high) @ high.T
            out.append(block[row_pos, col_pos])
        return torch.cat(out)


