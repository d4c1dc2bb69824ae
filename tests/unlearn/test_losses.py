"""The unlearning losses against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from mansu.unlearn.losses import (
    alternative_margin_hinge,
    ga_loss,
    graddiff_loss,
    kl_retain,
    logit_drop_hinge,
    npo_loss,
    rmu_loss,
    simnpo_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_ga_and_graddiff():
    assert_close(ga_loss(torch.tensor(2.5)), torch.tensor(-2.5))
    # −2.0 + 3·0.5 = −0.5
    assert_close(graddiff_loss(torch.tensor(2.0), torch.tensor(0.5), 3.0), torch.tensor(-0.5))


def test_kl_retain_by_hand():
    # Position 0: both uniform over 2 tokens, KL = 0.
    # Position 1: ref = softmax(ln3, 0) = (3/4, 1/4), θ uniform (1/2, 1/2):
    #   KL = 3/4·ln(3/4 / 1/2) + 1/4·ln(1/4 / 1/2) = 0.75·ln1.5 − 0.25·ln2 = 0.1308120
    ref_logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])
    logits = torch.zeros(1, 2, 2)
    kl_pos1 = 0.75 * math.log(1.5) - 0.25 * LN2
    assert_close(kl_retain(ref_logits, logits, torch.tensor([[1, 1]])),
                 torch.tensor(kl_pos1 / 2))  # mean over both positions
    assert_close(kl_retain(ref_logits, logits, torch.tensor([[0, 1]])),
                 torch.tensor(kl_pos1))  # position 0 masked out


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert_close(kl_retain(logits, logits.clone(), torch.ones(2, 5)), torch.tensor(0.0))


def test_npo_by_hand():
    # Log-ratios Δ = logp_θ − logp_ref = (0, ln3).
    logp_ref = torch.tensor([-2.0, -1.0])
    logp_theta = torch.tensor([-2.0, -1.0 + LN3], requires_grad=True)
    # β = 1: −2·log σ(−0) = 2ln2;  −2·log σ(−ln3) = −2·ln(1/4) = 4ln2;  mean = 3ln2
    loss = npo_loss(logp_theta, logp_ref, beta=1.0)
    assert_close(loss, torch.tensor(3 * LN2))
    # β = 2: −log σ(0) = ln2;  −log σ(−2ln3) = −ln(1/10) = ln10;  mean = ln20 / 2
    assert_close(npo_loss(logp_theta, logp_ref, beta=2.0), torch.tensor(math.log(20.0) / 2))
    # d/dlogp_θ_i = 2σ(βΔ_i)/B: σ(0) = 1/2 -> 0.5;  σ(ln3) = 3/4 -> 0.75
    (grad,) = torch.autograd.grad(loss, logp_theta)
    assert_close(grad, torch.tensor([0.5, 0.75]))


def test_npo_tends_to_gradient_ascent_as_beta_vanishes():
    # −(2/β)·log σ(−βΔ) = (2/β)·ln2 + Δ + βΔ²/4 + O(β²): for β → 0 NPO is GA on the sequence
    # log-likelihood, whose gradient in each logp_θ_i is 1/B.
    logp_ref = torch.tensor([-3.0, -1.0, -2.0], dtype=torch.float64)
    logp_theta = torch.tensor([-3.5, -1.0 + LN3, -1.0], dtype=torch.float64, requires_grad=True)
    beta = 1e-4
    loss = npo_loss(logp_theta, logp_ref, beta)
    assert_close(loss - 2 * LN2 / beta, (logp_theta - logp_ref).mean().detach(), atol=1e-3,
                 rtol=0)
    (npo_grad,) = torch.autograd.grad(loss, logp_theta)
    (ga_grad,) = torch.autograd.grad(ga_loss(-logp_theta.mean()), logp_theta)  # NLL = −mean logp
    assert_close(npo_grad, ga_grad, atol=1e-4, rtol=0)
    assert_close(ga_grad, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_simnpo_by_hand():
    # β = 1, γ = 0. Sequence 1: |y| = 2, logp = −2ln3 -> u = −(1/2)(−2ln3) = ln3, σ(u) = 3/4,
    #   −2·ln(3/4). Sequence 2: |y| = 4, logp = 0 -> u = 0, σ = 1/2, −2·ln(1/2) = 2ln2.
    #   mean = ln(4/3) + ln2 = ln(8/3)
    logp = torch.tensor([-2 * LN3, 0.0])
    lengths = torch.tensor([2, 4])
    assert_close(simnpo_loss(logp, lengths, beta=1.0, gamma=0.0), torch.tensor(math.log(8 / 3)))
    # γ = ln3 shifts u to (0, −ln3): 2ln2 and −2·ln(1/4) = 4ln2, mean 3ln2
    assert_close(simnpo_loss(logp, lengths, beta=1.0, gamma=LN3), torch.tensor(3 * LN2))


def test_simnpo_is_length_normalised():
    # A sequence twice as long with twice the log-likelihood has the same per-token likelihood.
    one = simnpo_loss(torch.tensor([-3.0]), torch.tensor([5]), beta=2.5, gamma=0.0)
    doubled = simnpo_loss(torch.tensor([-6.0]), torch.tensor([10]), beta=2.5, gamma=0.0)
    assert_close(one, doubled)


def test_rmu_by_hand():
    h_forget = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    control = torch.tensor([[[1.0, 1.0]]])
    h_retain = torch.tensor([[[2.0, 2.0], [0.0, 0.0]]])
    h_retain_ref = torch.tensor([[[1.0, 2.0], [0.0, 3.0]]])
    # forget: differences (0,−1), (−1,0) -> squares 0,1,1,0 -> mean 0.5
    # retain: differences (1,0), (0,−3) -> squares 1,0,0,9 -> mean 2.5;  0.5 + 2·2.5 = 5.5
    assert_close(rmu_loss(h_forget, control, h_retain, h_retain_ref, alpha=2.0),
                 torch.tensor(5.5))
    # Retain position 1 masked: retain squares 1,0 -> mean 0.5;  0.5 + 2·0.5 = 1.5
    assert_close(rmu_loss(h_forget, control, h_retain, h_retain_ref, alpha=2.0,
                          forget_mask=torch.tensor([[1, 1]]),
                          retain_mask=torch.tensor([[1, 0]])),
                 torch.tensor(1.5))


def test_logit_drop_hinge_by_hand():
    # Vocab 3, one sequence of 3 tokens [0, 1, 2]: positions 0 and 1 predict tokens 1 and 2.
    # θ0's answer logits: 2.0 (token 1 at pos 0) and 1.0 (token 2 at pos 1); θ's: 1.5 and -1.0.
    # Drops 0.5 and 2.0; margin 1: relu(1 − 0.5) = 0.5, relu(1 − 2) = 0 -> mean 0.25.
    labels = torch.tensor([[0, 1, 2]])
    ref = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [9.0, 9.0, 9.0]]])
    theta = torch.tensor([[[0.0, 1.5, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    assert_close(logit_drop_hinge(theta, ref, labels, 1.0), torch.tensor(0.25))
    # Position 1 unscored: only the 0.5 term is left.
    assert_close(logit_drop_hinge(theta, ref, torch.tensor([[0, 1, -100]]), 1.0), torch.tensor(0.5))
    # θ = θ0: every term is the margin itself.
    assert_close(logit_drop_hinge(ref, ref, labels, 0.3), torch.tensor(0.3))


def test_alternative_margin_hinge_by_hand():
    # Pos 0 predicts token 1: z = (0, 2, 1), best other 1 -> relu(0.5 + 2 − 1) = 1.5.
    # Pos 1 predicts token 2: z = (3, 0, -1), best other 3 -> relu(0.5 − 1 − 3) = 0.
    labels = torch.tensor([[0, 1, 2]])
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    assert_close(alternative_margin_hinge(logits, labels, 0.5), torch.tensor(0.75))
    assert_close(alternative_margin_hinge(logits, torch.tensor([[0, 1, -100]]), 0.5),
                 torch.tensor(1.5))
