"""Unlearning losses as pure functions of tensors (no model calls), shared by the baselines and
MANSU. Each docstring gives the formula and the reference it follows; every loss is *minimised*.

Notation: NLL is a mean token negative log-likelihood, log π(y|x) a sequence-summed log-prob,
|y| the number of scored tokens of a sequence, σ the logistic function.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def ga_loss(forget_nll: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: L = −NLL(forget)."""
    return -forget_nll


def graddiff_loss(forget_nll: torch.Tensor, retain_loss: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """Gradient difference: L = −NLL(forget) + α·R, where R is NLL(retain) or KL(ref‖θ) on the
    retain set (TOFU's ``grad_diff`` / ``KL`` with coefficient 1)."""
    return -forget_nll + alpha * retain_loss


def kl_retain(ref_logits: torch.Tensor, logits: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) of the next-token distributions, averaged over the positions where
    `mask` is true: mean_t Σ_v π_ref(v|t)·(log π_ref(v|t) − log π_θ(v|t)). Computed in fp32.

    The TOFU/NPO code averages over every position of the padded batch; padding is left out
    here, since how much of it a batch has depends only on the other texts in it."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    per_position = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(dim=-1)
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum()


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024):
    L = −(2/β)·mean_i log σ(−β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i))), sequence-summed log-probs.

    Its gradient in log π_θ(y_i) is 2σ(β·Δ_i)/B with Δ_i the log-ratio: 1/B at Δ = 0 and for
    β → 0 (then L ≈ (2/β)·log 2 + mean Δ: gradient ascent on the sequence likelihood), and it
    fades as a sequence becomes unlikely, which is what slows NPO's collapse."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp_theta - logp_ref)).mean()


def simnpo_loss(logp_theta: torch.Tensor, lengths: torch.Tensor, beta: float,
                gamma: float) -> torch.Tensor:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised:
    L = −(2/β)·mean_i log σ(−(β/|y_i|)·log π_θ(y_i|x_i) − γ).

    This is the paper's formula. The authors' code subtracts γ before multiplying by β, i.e.
    uses β·γ in place of γ; the two agree at the default γ = 0."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / lengths) * logp_theta - gamma).mean()


def rmu_loss(h_forget: torch.Tensor, control: torch.Tensor, h_retain: torch.Tensor,
             h_retain_ref: torch.Tensor, alpha: float, forget_mask: torch.Tensor | None = None,
             retain_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Representation misdirection (Li et al. 2024, WMDP):
    L = MSE(h_θ(forget), c·u) + α·MSE(h_θ(retain), h_ref(retain)),
    with hidden states [B, T, d] of one layer, c·u the scaled control vector [1, 1, d] and MSE
    the mean over positions and features. Masks [B, T] restrict the mean to real tokens (the
    WMDP code averages over padding too). Computed in fp32."""
    forget_term = _masked_mse(h_forget.float(), control.float().expand_as(h_forget), forget_mask)
    retain_term = _masked_mse(h_retain.float(), h_retain_ref.float(), retain_mask)
    return forget_term + alpha * retain_term


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    squared = (a - b).pow(2)
    if mask is None:
        return squared.mean()
    weights = mask.to(squared.dtype).unsqueeze(-1)
    return (squared * weights).sum() / (weights.sum() * a.shape[-1])


def _answer_logits(logits: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next-token logits [B, T-1, V] (fp32), the scored targets' logits [B, T-1] and the
    scored mask: position t predicts labels[:, t+1]; -100 labels are not scored."""
    z = logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != -100
    answer = z.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return z, answer, scored


def logit_drop_hinge(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """QUAIL's logit-space hinge (Mishra & Mehreen 2026, arXiv 2601.15538, as its abstract
    states it: the forget example's logits must differ from the original model's by at least a
    margin). One-sided, on the scored forget tokens y_t:
    L = mean_t relu(m − (z_ref[y_t] − z_θ[y_t])): zero once the answer's logit has fallen at least
    m below θ0's, so a quantization error of the logits smaller than m cannot bring it back."""
    _, answer, scored = _answer_logits(logits, labels)
    _, ref_answer, _ = _answer_logits(ref_logits, labels)
    hinge = torch.relu(margin - (ref_answer - answer)) * scored
    return hinge.sum() / scored.sum()


def alternative_margin_hinge(logits: torch.Tensor, labels: torch.Tensor,
                             margin: float) -> torch.Tensor:
    """The margin hinge against the alternatives: on each scored forget token y_t,
    L = mean_t relu(m + z[y_t] − max_{v≠y_t} z[v]): zero once the answer's logit is at least m
    below the best other token's, so a logit error smaller than m/2 per token cannot restore it."""
    z, answer, scored = _answer_logits(logits, labels)
    targets = labels[:, 1:].clamp_min(0).unsqueeze(-1)
    best_other = z.scatter(-1, targets, float("-inf")).amax(-1)
    hinge = torch.relu(margin + answer - best_other) * scored
    return hinge.sum() / scored.sum()
