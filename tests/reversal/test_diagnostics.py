"""docs/method.md §2 diagnostics on hand-built tensors whose answers are worked out by hand."""

import json
import math

import pytest
import torch

from mansu.quantize.quantizer import NF4_CODE, NF4_MIDPOINTS, expand_blocks, normalized_blocks, reference_nf4
from mansu.reversal.diagnostics import (
    bin_width_toward,
    first_order_decomposition,
    layer_type,
    noise_like_quantization,
    update_diagnostics,
)

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
DOWN_PROJ = "model.layers.0.mlp.down_proj.weight"
M = NF4_MIDPOINTS.double()  # m[j] = boundary between code j and j + 1


def _unit_block():
    """One block of 64 whose absmax is 1.0 (element 0), so normalised x equals w."""
    w = torch.zeros(64)
    w[0] = 1.0
    return w


def test_bin_width_and_code_flips_by_hand():
    # w = 0.1 lies in code 8's bin (m7, m8] = (0.0397901, 0.1202552]: it is 0.0202552 below the
    # upper boundary and 0.0602099 above the lower one.
    #   Δ = +0.01: ratio 0.0202552 / 0.01 = 2.0255, stays at code 8   (0.11 <= m8)
    #   Δ = +0.03: ratio 0.0202552 / 0.03 = 0.6752, flips to code 9   (0.13 >  m8)
    #   Δ = -0.07: ratio 0.0602099 / 0.07 = 0.8601, flips to code 7   (0.03 <= m7)
    w0 = _unit_block()
    w0[1:4] = 0.1
    delta = torch.zeros(64)
    delta[1:4] = torch.tensor([0.01, 0.03, -0.07])
    x = torch.tensor(0.1).item()  # the float32 value of 0.1
    up, down = M[8].item() - x, x - M[7].item()
    assert up == pytest.approx(0.0202552, abs=1e-7) and down == pytest.approx(0.0602099, abs=1e-7)

    width = bin_width_toward(w0, delta)
    assert width[1:4].tolist() == pytest.approx([up, up, down], rel=1e-12)
    assert math.isnan(width[0]) and math.isnan(width[10])  # Δ = 0: no direction

    result = update_diagnostics({Q_PROJ: w0}, {Q_PROJ: w0 + delta})
    assert result["n_quantized_weights"] == 64 and result["n_moved"] == 3
    assert result["code_flip_share_moved"] == pytest.approx(2 / 3)
    assert result["code_flip_share_all"] == pytest.approx(2 / 64)
    # Median of the three ratios is the middle one, read from a histogram good to 0.23%.
    assert result["bin_update_ratio_median"] == pytest.approx(down / 0.07, rel=3e-3)
    assert result["bin_update_ratio_n_unbounded"] == 0
    # Carried: <Q(θu) - Q(θ0), Δ> / <Δ, Δ> = (0.03 (c9 - c8) + 0.07 c8) / (0.01² + 0.03² + 0.07²).
    c8, c9 = NF4_CODE[8].item(), NF4_CODE[9].item()
    expected = (0.03 * (c9 - c8) + 0.07 * c8) / (0.01**2 + 0.03**2 + 0.07**2)
    assert result["carried_share"] == pytest.approx(expected, rel=1e-5)
    json.dumps(result, allow_nan=False)  # JSON-ready


def test_unreachable_boundaries_are_infinite():
    # absmax 0.5 (element 0, code 0); x = 0.45 / 0.5 = 0.9 is code 15 (above m14 = 0.8614784);
    # x = 0.2 / 0.5 = 0.4 is code 12, (m11, m12] = (0.3893102, 0.5016634].
    w = torch.zeros(64)
    w[0], w[1], w[2] = -0.5, 0.45, 0.2
    upward = bin_width_toward(w, torch.ones(64))
    downward = bin_width_toward(w, -torch.ones(64))
    assert upward[0] == math.inf and downward[0] == math.inf  # the block's absmax element
    assert upward[1] == math.inf  # code 15 has no boundary above
    assert downward[1] == pytest.approx((0.9 - M[14].item()) * 0.5, rel=1e-6)
    assert upward[2] == pytest.approx((M[12].item() - 0.4) * 0.5, rel=1e-6)
    assert downward[2] == pytest.approx((0.4 - M[11].item()) * 0.5, rel=1e-6)

    moved = w.clone()
    moved[0], moved[1], moved[2] = -0.45, 0.46, 0.19  # absmax inward, code 15 outward, in-bin
    result = update_diagnostics({Q_PROJ: w}, {Q_PROJ: moved})
    assert result["bin_update_ratio_n_unbounded"] == 2
    # Only element 2 has a reachable boundary: ratio (0.4 - m11) * 0.5 / 0.01.
    ratio = (0.4 - M[11].item()) * 0.5 / 0.01
    assert result["bin_update_ratio_median"] == pytest.approx(ratio, rel=3e-3)


def test_carried_share_is_one_for_code_to_code_moves_and_zero_for_in_bin_moves():
    # q: weights sitting exactly on code values 1..13 each step to the next code value, so
    # Q(θ0) = θ0, Q(θu) = θu and Q(θu) - Q(θ0) = Δ exactly.
    q0 = _unit_block()
    q0[1:14] = NF4_CODE[1:14]
    qu = q0.clone()
    qu[1:14] = NF4_CODE[2:15]
    # down: the same weights move by 1e-4, far inside their bins, so no code changes.
    down0 = q0.clone()
    downu = down0.clone()
    downu[1:14] += 1e-4

    only_q = update_diagnostics({Q_PROJ: q0}, {Q_PROJ: qu})
    assert only_q["carried_share"] == 1.0 and only_q["code_flip_share_moved"] == 1.0
    only_down = update_diagnostics({DOWN_PROJ: down0}, {DOWN_PROJ: downu})
    assert only_down["carried_share"] == 0.0 and only_down["code_flip_share_all"] == 0.0

    both = update_diagnostics({Q_PROJ: q0, DOWN_PROJ: down0}, {Q_PROJ: qu, DOWN_PROJ: downu})
    assert both["carried_share_by_type"] == {"q": 1.0, "down": 0.0}
    q_norm = float(((qu - q0).double() ** 2).sum())
    down_norm = float(((downu - down0).double() ** 2).sum())
    assert both["carried_share"] == pytest.approx(q_norm / (q_norm + down_norm), rel=1e-12)


def test_bf16_storage_moves_only_small_weights_which_stay_in_the_zero_bin():
    # The docs/method.md finding in miniature: a 1e-4 step is below half a bf16 ulp at |w| = 0.25
    # (ulp 2**-9) but not at |w| = 0.001 (ulp 2**-17), so only the small weights move, and they
    # sit mid zero-bin (x ≈ 0.002, bin (-0.0455, 0.0398]) where the step cannot flip a code.
    w0 = torch.full((64,), 0.25)
    w0[0] = 0.5
    w0[32:] = 0.001
    w0[1::2] *= -1
    w0 = w0.to(torch.bfloat16)
    wu = (w0.float() + 1e-4).to(torch.bfloat16)
    result = update_diagnostics({Q_PROJ: w0}, {Q_PROJ: wu})
    assert result["moved_share"] == 0.5
    assert result["moved_zero_bin_share"] == 1.0
    assert result["code_flip_share_all"] == 0.0 and result["carried_share"] == 0.0
    stored_small = torch.tensor(0.001).to(torch.bfloat16).item()
    assert result["moved_abs_w_p50"] == pytest.approx(stored_small, rel=3e-3)


def test_moved_weight_quantiles_and_zero_bin_share():
    # Ten moved weights |w| = 0.01..0.10 beside an unmoved absmax 1.0: the empirical p50 and p90
    # are the 5th and 9th values; 0.01, 0.02, 0.03 lie below m7 = 0.0398 (zero code).
    w0 = _unit_block()
    w0[1:11] = 0.01 * torch.arange(1, 11)
    wu = w0.clone()
    wu[1:11] += 1e-6
    result = update_diagnostics({Q_PROJ: w0}, {Q_PROJ: wu})
    assert result["moved_abs_w_p50"] == pytest.approx(0.05, rel=3e-3)
    assert result["moved_abs_w_p90"] == pytest.approx(0.09, rel=3e-3)
    assert result["moved_zero_bin_share"] == pytest.approx(0.3)


def test_in_bin_positions_by_hand():
    # 1.0 sits on its bin's upper edge (position 1 -> last bin); 0.1 is at
    # (0.1 - m7) / (m8 - m7) = 0.748 (bin 7); zero is at (0 - m6) / (m7 - m6) = 0.534 (bin 5).
    w0 = _unit_block()
    w0[1] = 0.1
    wu = w0.clone()
    wu[1] = 0.1001
    result = update_diagnostics({Q_PROJ: w0}, {Q_PROJ: wu})
    expected = [0.0] * 10
    expected[9], expected[7], expected[5] = 1 / 64, 1 / 64, 62 / 64
    assert result["inbin_position_hist_all"] == pytest.approx(expected)
    assert result["inbin_position_hist_moved"] == pytest.approx([0.0] * 7 + [1.0, 0.0, 0.0])


def test_flips_follow_the_uniform_position_prediction_for_small_random_updates():
    # Gaussian weights, small Gaussian steps, block absmax elements held fixed (so scales do not
    # move): the observed flip rate should match min(1, |Δ|/W), i.e. a calibration slope near 1.
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(128, 256, generator=generator) * 0.05
    delta = torch.randn(128, 256, generator=generator) * 1e-3
    _, absmax = normalized_blocks(w0)
    delta.view(-1)[w0.view(-1).abs() == expand_blocks(absmax, w0.numel())] = 0
    result = update_diagnostics({Q_PROJ: w0}, {Q_PROJ: w0 + delta})
    assert result["flip_calibration_slope"] == pytest.approx(1.0, abs=0.1)
    big_bins = [b for b in result["flip_calibration"] if b["n"] > 5000]
    assert big_bins
    for calibration_bin in big_bins:
        assert calibration_bin["observed"] == pytest.approx(calibration_bin["predicted"], rel=0.1)
    # θ0's own positions inside their bins are close to uniform.
    assert all(0.08 < share < 0.12 for share in result["inbin_position_hist_all"])


def test_layer_type_from_weight_name():
    assert layer_type(Q_PROJ) == "q"
    assert layer_type("model.layers.11.mlp.gate_proj.weight") == "gate"
    assert layer_type("transformer.h.0.attn.c_attn.weight") == "c_attn"


def test_first_order_decomposition_by_hand():
    # Dyadic numbers, so every float operation is exact:
    # predicted = g·(qu - θu) = 1·0.25 + (-2)·(-0.125) = 0.5
    # base      = g·(q0 - θ0) = 1·0 + (-2)·0.125 = -0.25
    # rounding  = g·(qu - q0 - Δ) = 1·(0.5 - 0.25) + (-2)·(-0.375 + 0.125) = 0.75
    def t(*values):
        return {"w": torch.tensor(values)}

    parts = first_order_decomposition(
        grad=t(1.0, -2.0),
        theta0=t(0.5, 0.25),
        thetau=t(0.75, 0.125),
        q0=t(0.5, 0.375),
        qu=t(1.0, 0.0),
    )
    assert parts == {"predicted": 0.5, "base_error": -0.25, "update_rounding": 0.75}


def test_first_order_decomposition_is_exact_for_a_linear_loss():
    generator = torch.Generator().manual_seed(3)
    names = (Q_PROJ, DOWN_PROJ)
    theta0 = {n: torch.randn(16, 64, generator=generator) * 0.05 for n in names}
    thetau = {n: w + torch.randn(16, 64, generator=generator) * 1e-3 for n, w in theta0.items()}
    grad = {n: torch.randn(16, 64, generator=generator) for n in names}
    q0 = {n: reference_nf4(w) for n, w in theta0.items()}
    qu = {n: reference_nf4(w) for n, w in thetau.items()}
    parts = first_order_decomposition(grad, theta0, thetau, q0, qu)
    assert parts["base_error"] + parts["update_rounding"] == pytest.approx(
        parts["predicted"], rel=1e-12
    )

    def linear_loss(state):  # loss(θ) = g·θ, whose first-order change is the whole change
        return sum(float((grad[n].double() * state[n].double()).sum()) for n in names)

    assert parts["predicted"] == pytest.approx(linear_loss(qu) - linear_loss(thetau), rel=1e-10)


def test_noise_control_matches_each_tensors_quantization_error_rms():
    generator = torch.Generator().manual_seed(5)
    state = {
        Q_PROJ: torch.randn(32, 64, generator=generator) * 0.05,
        DOWN_PROJ: torch.randn(64, 32, generator=generator) * 0.2,
        "model.embed_tokens.weight": torch.randn(10, 64, generator=generator),
    }
    quantized = {n: reference_nf4(state[n]) for n in (Q_PROJ, DOWN_PROJ)}
    noisy = noise_like_quantization(state, quantized, seed=0)
    assert noisy["model.embed_tokens.weight"] is state["model.embed_tokens.weight"]
    for name, q_weight in quantized.items():
        assert noisy[name].dtype == state[name].dtype
        noise_rms = (noisy[name].double() - state[name].double()).pow(2).mean().sqrt()
        error_rms = (q_weight.double() - state[name].double()).pow(2).mean().sqrt()
        assert noise_rms.item() == pytest.approx(error_rms.item(), rel=1e-4)
        # Untargeted: the noise is not the quantization error itself.
        assert not torch.allclose(noisy[name], q_weight)
    again = noise_like_quantization(state, quantized, seed=0)
    other = noise_like_quantization(state, quantized, seed=1)
    assert torch.equal(again[Q_PROJ], noisy[Q_PROJ])
    assert not torch.equal(other[Q_PROJ], noisy[Q_PROJ])
