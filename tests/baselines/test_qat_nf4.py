"""Straight-through NF4 unlearning: its forward is bitsandbytes' Linear4bit forward bit for bit,
its gradient is the fp gradient at Q(θ), and it trains through NF4 in every storage."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from conftest import run_baseline, snapshot, tiny_llama
from torch import nn

from baselines.qat_nf4 import QuantizedForward, fake_nf4, quantized_weight_names
from mansu.quantize.quantizer import quantize_model, reference_nf4


class OneLayer(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(128, 48, bias=True).to(dtype)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_forward_equals_bitsandbytes_linear4bit_bit_for_bit(dtype, blocksize):
    model = OneLayer(dtype)
    x = torch.randn(5, 7, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    bnb = quantize_model(model, quant_type="nf4", blocksize=blocksize, skip_modules=())
    assert isinstance(bnb.proj, Linear4bit)
    names = quantized_weight_names(model, ())
    with torch.no_grad():
        expected = bnb(x)
        ours = QuantizedForward(model, names, blocksize)(x=x)
    assert ours.dtype == dtype and torch.equal(ours, expected)
    assert not torch.equal(ours, model(x))  # the rounding is really there


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_the_fp_gradient_at_the_quantized_weight(dtype):
    model = OneLayer(dtype)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    QuantizedForward(model, ["proj.weight"], 64)(x=x).float().pow(2).sum().backward()
    # The same loss on a plain fp layer whose weight *is* Q(θ): the STE passes its gradient on.
    plain = OneLayer(dtype)
    with torch.no_grad():
        plain.proj.weight.copy_(reference_nf4(model.proj.weight, 64, dtype))
    plain(x).float().pow(2).sum().backward()
    assert torch.equal(model.proj.weight.grad, plain.proj.weight.grad)
    assert torch.equal(model.proj.bias.grad, plain.proj.bias.grad)


def test_fake_nf4_backward_is_the_identity():
    w = torch.randn(4, 64, requires_grad=True)
    upstream = torch.randn(4, 64)
    (fake_nf4(w) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("storage", ["fp32", "bf16", "bf16_master"])
@pytest.mark.parametrize("forget_loss", ["ga", "npo"])
def test_trains_every_parameter_through_nf4_in_each_storage(storage, forget_loss):
    model = tiny_llama(torch.float32 if storage == "fp32" else torch.bfloat16)
    before = snapshot(model)
    result = run_baseline("qat_nf4", model, storage=storage, forget_loss=forget_loss, lr=1e-2,
                          max_steps=2, blocksize=32)
    assert result.steps == 2 and {p.dtype for p in model.parameters()} == {before[
        "lm_head.weight"].dtype}
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert result.info["fake_quantized_tensors"] == 3 * 7  # q k v o gate up down per layer
    assert all(p.grad is None for p in model.parameters())


def test_npo_starts_at_log_ratio_zero_against_the_quantized_reference():
    result = run_baseline("qat_nf4", forget_loss="npo", retain_loss="none", lr=1e-2,
                          max_steps=2, blocksize=32)
    assert result.losses[0] == pytest.approx(2 / 0.1 * torch.log(torch.tensor(2.0)).item())


@pytest.mark.parametrize("knobs, message", [
    ({"forget_loss": "rmu"}, "forget_loss must be 'ga' or 'npo'"),
    ({"retain_loss": "kl"}, "retain_loss must be 'none' or 'nll'"),
    ({"skip_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "lm_head"]}, "nothing to fake-quantize"),
])
def test_impossible_settings_fail_before_training(knobs, message):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        run_baseline("qat_nf4", model, **knobs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
