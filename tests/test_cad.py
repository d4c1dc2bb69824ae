"""mansu.cad: hand-worked values, the planted suppression and erasure controls, the noise floor,
and attribution through bitsandbytes 4-bit layers."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import bitsandbytes as bnb
import pytest
import torch
from test_attribution import FORGET, RETAIN, build, make_tokenizer
from torch import nn

from mansu.cad import behaviour_ratio, cad, cad_js, cad_report, noise_floor
from mansu.circuit import parameter_mask
from mansu.eap_ig import attribute
from mansu.selection import select_circuit

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_cad_is_the_clipped_projection_on_the_circuit():
    a0 = torch.tensor([1.0, 2.0, 7.0, -5.0])
    circuit = torch.tensor([True, True, False, False])  # <a0_C, a0_C> = 5
    assert cad(a0, a0, circuit) == 0.0
    assert cad(a0, torch.tensor([0.5, 1.0, 0.0, 0.0]), circuit) == pytest.approx(0.5)
    assert cad(a0, torch.tensor([2.0, -1.0, 9.0, 9.0]), circuit) == pytest.approx(1.0)  # orthogonal
    assert cad(a0, torch.tensor([-1.0, -2.0, 7.0, -5.0]), circuit) == 1.0  # reversed: clipped
    assert cad(a0, torch.tensor([3.0, 6.0, 0.0, 0.0]), circuit) == 0.0  # amplified: clipped
    with pytest.raises(ValueError, match="zero"):
        cad(torch.tensor([0.0, 0.0, 1.0, 1.0]), a0, circuit)


def test_cad_js_hand_values():
    p = torch.tensor([2.0, 0.0])
    assert cad_js(p, -3 * p) == 0.0  # |a| / ||a||_1 ignores sign and scale
    assert cad_js(p, torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    # m = (0.75, 0.25): KL(p||m) = log2(4/3), KL(q||m) = (log2(2/3) + log2(2)) / 2
    expected = (torch.log2(torch.tensor(4 / 3)) + (torch.log2(torch.tensor(2 / 3)) + 1) / 2) / 2
    assert cad_js(p, torch.tensor([1.0, -1.0])) == pytest.approx(float(expected))


def test_behaviour_ratio():
    assert behaviour_ratio(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])) == 0.5
    with pytest.raises(ValueError, match="undefined"):
        behaviour_ratio(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 2.0]))


def _letter_known_by(model, tokenizer) -> tuple[int, list]:
    """The answer letter θ0 prefers on average over FORGET, and FORGET answered with it, so that
    θ0's mean M is positive (it 'knows' the items)."""
    means = []
    for letter in range(4):
        items = [dataclasses.replace(q, answer=letter) for q in FORGET]
        means.append(attribute(model, tokenizer, items, scoring="letter", ig_steps=1,
                                    progress=False).metric_clean.mean())
    letter = int(torch.stack(means).argmax())
    return letter, [dataclasses.replace(q, answer=letter) for q in FORGET]


def test_planted_suppression_and_erasure(tokenizer):
    model = build("llama", 0.2)
    letter, forget = _letter_known_by(model, tokenizer)
    settings = dict(scoring="letter", progress=False)
    a0 = attribute(model, tokenizer, forget, **settings)
    a_r = attribute(model, tokenizer, RETAIN, **settings)
    circuit = select_circuit(model, tokenizer, forget, a0, a_r, progress=False)
    assert 0 < circuit.size < a0.flat().numel()
    assert a0.metric_clean.mean() > 0

    # Suppression only: a large negative bias on the answer letter's logit, after the circuit.
    letter_id = tokenizer(" " + "ABCD"[letter])["input_ids"][0]
    bias = torch.zeros(model.config.vocab_size)
    bias[letter_id] = -20.0
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    suppressed = attribute(model, tokenizer, forget, **settings)
    handle.remove()
    assert cad(a0, suppressed, circuit) <= 0.1
    assert behaviour_ratio(a0, suppressed) < 0.5

    # Erasure: the circuit's heads and neurons no longer write anything.
    erased = copy.deepcopy(model)
    outputs = ("o_proj.weight", "down_proj.weight")
    params = dict(erased.named_parameters())
    with torch.no_grad():
        for name, mask in parameter_mask(model, circuit).items():
            if name.endswith(outputs):
                params[name][mask] = 0.0
    assert cad(a0, attribute(erased, tokenizer, forget, **settings), circuit) >= 0.8


def test_noise_floor(tokenizer):
    model = build("llama", 0.2)
    settings = dict(scoring="cloze", progress=False)
    a0 = attribute(model, tokenizer, FORGET, **settings)
    circuit = select_circuit(model, tokenizer, FORGET, a0,
                                  attribute(model, tokenizer, RETAIN, **settings),
                                  progress=False)
    with pytest.raises(ValueError, match="at least 2 items"):
        noise_floor(model, tokenizer, FORGET[:1], circuit, **settings)
    # Two halves holding the same question attribute identically: the floor is exactly 0.
    assert noise_floor(model, tokenizer, [FORGET[0]] * 4, circuit, **settings) == 0.0
    floor = noise_floor(model, tokenizer, FORGET, circuit, **settings)
    assert 0.0 <= floor <= 1.0

    report = cad_report(a0, a0, circuit, a_q=a0, floor=floor)
    assert report["cad"] == 0.0 and report["beta"] == 1.0 and report["cad_q"] == 0.0
    assert report["cad_minus_floor"] == -floor
    json.dumps(report, allow_nan=False)


def _to_4bit(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(model with every decoder Linear as an NF4 Linear4bit, float model with the same weights
    dequantized)."""
    quantized, reference = copy.deepcopy(model), copy.deepcopy(model)
    for name, linear in list(model.model.layers.named_modules()):
        if not isinstance(linear, nn.Linear):
            continue
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                  bias=linear.bias is not None, compute_dtype=torch.float32,
                                  compress_statistics=False, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                         quant_type="nf4", blocksize=64,
                                         compress_statistics=False)
        layer = layer.to("cpu")  # quantizes
        # This CPU's AVX512-BF16 path would repack the weight at the first no-grad forward.
        layer.support_avx512bf16_for_cpu = False
        parent, child = name.rsplit(".", 1)
        quantized.model.layers.get_submodule(parent).register_module(child, layer)
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        reference.model.layers.get_submodule(name).weight.data.copy_(dequantized)
    return quantized, reference


def test_attribution_runs_through_4bit_layers(tokenizer):
    model = build("llama", 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    quantized, reference = _to_4bit(model)
    assert isinstance(quantized.model.layers[1].self_attn.o_proj, bnb.nn.Linear4bit)
    got = attribute(quantized, tokenizer, FORGET, progress=False)
    expected = attribute(reference, tokenizer, FORGET, progress=False)
    assert got.flat().abs().sum() > 0
    torch.testing.assert_close(got.flat(), expected.flat(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got.metric_clean, expected.metric_clean, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in quantized.parameters())
