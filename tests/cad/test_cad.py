"""mansu.cad.divergence: hand-worked values, per-item attribution, the noise floors, the controls CAD can fail
(downstream suppression, erasure in the circuit, no change, a random edit), and attribution through
bitsandbytes 4-bit layers."""

from __future__ import annotations

import copy
import json
import os

import bitsandbytes as bnb
import pytest
import torch
from conftest import FORGET_MCQS as FORGET
from conftest import RETAIN_MCQS as RETAIN
from conftest import build
from torch import nn

from mansu.attribution.eap_ig import attribute
from mansu.attribution.items import attribute_items, readout_matrix, write_gradients
from mansu.attribution.selection.sufficiency import select_circuit
from mansu.cad.controls import run_controls
from mansu.cad.divergence import (
    DEFINITION,
    SCORE_VARIANTS,
    VARIANTS,
    behaviour_ratio,
    cad,
    cad_js,
    cad_report,
    noise_floors,
    output_weights,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# FORGET, RETAIN, build and the tokenizer fixture are conftest's, shared with tests/attribution.


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


def test_per_item_attribution_is_attribute_split_by_item(tokenizer):
    model = build("llama", 0.2)
    settings = dict(scoring="cloze", ig_steps=2, batch_size=3, progress=False)
    whole = attribute(model, tokenizer, FORGET, **settings)
    items = attribute_items(model, tokenizer, FORGET, **settings)
    torch.testing.assert_close(items.attribution.flat(), whole.flat())
    torch.testing.assert_close(items.scores.mean(0), whole.flat())
    torch.testing.assert_close(items.attribution.metric_clean, whole.metric_clean)
    assert items.scores.shape[0] == items.direct.shape[0] == len(FORGET)


def test_frozen_scores_on_theta0_are_its_eap_ig_scores(tokenizer):
    """θ0's gradient at a layer's output, read through W_out, is the EAP-IG gradient at its nodes:
    scored with its own kept gradients θ0 gets its own scores back,
    and attribute_items with them gives the same numbers as write_gradients."""
    model = build("llama", 0.2)
    settings = dict(scoring="cloze", ig_steps=2, batch_size=3, progress=False)
    items = attribute_items(model, tokenizer, FORGET, **settings)
    keys = [("heads", 1), ("neurons", 0)]
    gradients, frozen = write_gradients(model, tokenizer, FORGET, keys, **settings)
    layers, heads = len(model.model.layers), model.config.num_attention_heads
    held = torch.zeros(layers * heads + items.scores.shape[1] - layers * heads, dtype=torch.bool)
    held[heads: 2 * heads] = True
    held[layers * heads: layers * heads + (items.scores.shape[1] - layers * heads) // layers] = True
    assert frozen[:, ~held].abs().max() == 0
    torch.testing.assert_close(frozen[:, held], items.scores[:, held], rtol=1e-4, atol=1e-6)
    again = attribute_items(model, tokenizer, FORGET, frozen_gradients=gradients, **settings)
    torch.testing.assert_close(again.frozen, frozen)


def test_direct_effect_by_hand(tokenizer):
    """The last layer's neurons feed the final norm and the unembedding only: their summed direct
    effect under the model's own readout is Σ_entries weight · <readout[tok], W_down diff>."""
    model = build("llama", 0.2)
    items = attribute_items(model, tokenizer, FORGET[:1], scoring="letter", progress=False)
    readout = readout_matrix(model)
    letter_ids = [tokenizer(" " + c)["input_ids"][0] for c in "ABCD"]
    answer = FORGET[0].answer
    weights = torch.tensor([1.0 if c == answer else -1 / 3 for c in range(4)])
    direction = (readout[letter_ids] * weights[:, None]).sum(0)  # [d_model]
    down = model.model.layers[-1].mlp.down_proj.weight.detach().float()
    diff = items.diffs["neurons", len(model.model.layers) - 1][0]  # read position only
    expected = float(direction @ (down @ diff))
    n_heads = model.config.num_attention_heads * len(model.model.layers)
    layer_nodes = items.direct[0, n_heads:].view(len(model.model.layers), -1)[-1]
    assert float(layer_nodes.sum()) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def theta0_circuit(tokenizer, settings: dict):
    """A small Llama, its per-item attribution on FORGET (with its frozen scores), the circuit
    and its output weights, and θ0's write gradients."""
    model = build("llama", 0.2)
    a0 = attribute_items(model, tokenizer, FORGET, **settings)
    circuit = select_circuit(model, tokenizer, FORGET, a0.attribution,
                             attribute(model, tokenizer, RETAIN, **settings), progress=False)
    weights = output_weights(model, circuit)
    gradients, a0.frozen = write_gradients(model, tokenizer, FORGET, weights, **settings)
    return model, a0, circuit, weights, gradients


def test_noise_floors_and_report(tokenizer):
    settings = dict(scoring="cloze", progress=False)
    model, a0, circuit, weights, _ = theta0_circuit(tokenizer, settings)
    with pytest.raises(ValueError, match="at least 2 items"):
        noise_floors(attribute_items(model, tokenizer, FORGET[:1], **settings), circuit,
                     weights)
    # Halves holding the same question give the same profile: every floor is exactly 0.
    same = attribute_items(model, tokenizer, [FORGET[0]] * 4, **settings)
    _, same.frozen = write_gradients(model, tokenizer, [FORGET[0]] * 4, weights, **settings)
    floors = noise_floors(same, circuit, weights, splits=5)
    assert all(f["value"] == pytest.approx(0.0, abs=1e-9) for f in floors["variants"].values())
    floors = noise_floors(a0, circuit, weights, splits=20)
    assert floors["items_per_half"] == 1 and floors["splits"] == 20
    for name in VARIANTS:
        f = floors["variants"][name]
        assert 0.0 <= f["ci_low"] <= f["value"] <= f["ci_high"] <= 1.0
    kept = a0.keep_units(circuit)
    report = cad_report(kept, a0, circuit, weights0=weights, weightsu=weights, floors=floors,
                        thetaq=a0, weightsq=weights)
    assert report["definition"] == DEFINITION
    assert report["beta"] == 1.0 and report["cad_q"] == 0.0
    for name in VARIANTS:
        assert report["variants"][name]["value"] == pytest.approx(0.0, abs=1e-9)
    assert report["cad_minus_floor"] == pytest.approx(-floors["variants"][DEFINITION]["value"])
    json.dumps(report, allow_nan=False)


def test_cad_without_scores_keeps_the_gradient_free_variants(tokenizer):
    """``scores=False`` skips the EAP-IG passes: β and every gradient-free variant (the verdict's
    ``direct`` among them) are the numbers of the full attribution; the score-based ones are None."""
    settings = dict(scoring="cloze", progress=False)
    model, a0, circuit, weights, gradients = theta0_circuit(tokenizer, settings)
    floors = noise_floors(a0, circuit, weights, splits=5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    full, cheap = (attribute_items(other, tokenizer, FORGET, frozen_gradients=gradients,
                                   scores=scores, **settings) for scores in (True, False))
    assert not cheap.has_scores and cheap.scores.abs().max() == 0
    common = dict(weights0=weights, weightsu=output_weights(other, circuit), floors=floors)
    with_scores = cad_report(a0.keep_units(circuit), full, circuit, **common)
    without = cad_report(a0.keep_units(circuit), cheap, circuit, **common)
    assert without["cad"] == with_scores["cad"] and without["beta"] == with_scores["beta"]
    for name in VARIANTS:
        if name in SCORE_VARIANTS:
            assert "value" not in without["variants"][name] and without["cad_projection"] is None
        else:
            assert without["variants"][name]["value"] == with_scores["variants"][name]["value"]
    with pytest.raises(ValueError, match="unknown CAD definition"):
        cad_report(a0.keep_units(circuit), cheap, circuit, definition="projection", **common)
    json.dumps(without, allow_nan=False)


NECESSITY = {"rule": "necessity", "share_of_parameters": 0.05, "max_evaluations": 12,
             "curve_points": 0, "check_stability": False}


@pytest.mark.parametrize("selection", [None, NECESSITY], ids=["sufficiency", "necessity"])
def test_controls_separate_suppression_from_erasure(tiny, selection):
    """Downstream suppression leaves the circuit's activations bit-identical and the chosen CAD at
    0; training the circuit's own weights to the same β moves it beyond its floor's interval
    (with the necessity rule: the circuit's selected weights only)."""
    benchmark, model, tokenizer = tiny
    result = run_controls(model, tokenizer, benchmark.forget.questions[:24],
                          benchmark.retain.questions[:24],
                          attribute_kwargs=dict(scoring="cloze", ig_steps=2, batch_size=32),
                          selection=selection, target_beta=0.5, lr=1e-2, max_steps=300, splits=50)
    assert result["circuit"]["rule"] == (selection or {"rule": "sufficiency"})["rule"]
    controls = result["controls"]
    assert controls["suppression"]["circuit_activations_identical"]
    assert controls["random"]["circuit_activations_identical"]
    assert not controls["erasure"]["circuit_activations_identical"]
    assert controls["none"]["report"]["beta"] == 1.0
    for name in ("suppression", "erasure"):
        assert controls[name]["report"]["beta"] <= 0.6, (name, controls[name])
    floor = result["floors"]["variants"][DEFINITION]
    chosen = {name: c["report"]["variants"][DEFINITION]["value"] for name, c in controls.items()}
    assert chosen["suppression"] == chosen["none"] == chosen["random"] == 0.0
    assert chosen["erasure"] > floor["ci_high"]
    assert controls["random"]["edit_norm"] == pytest.approx(controls["suppression"]["edit_norm"])


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
