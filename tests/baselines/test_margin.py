"""QUAIL-style margin unlearning: the measured margin is NF4's logit error, the hinge is what it
trains on, and impossible settings are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import FORGET_SPLIT, SPLIT_TOKENIZER, run_baseline, snapshot, tiny_llama

from baselines.margin import quantization_logit_error
from baselines.qat_nf4 import QuantizedForward, quantized_weight_names
from mansu.unlearn.batches import text_batches
from mansu.unlearn.likelihood import forward_logits


def test_measured_margin_is_the_rms_nf4_error_of_the_answer_logits():
    model = tiny_llama()
    batch = next(text_batches(SPLIT_TOKENIZER, FORGET_SPLIT.corpus, batch_size=4, seed=0,
                              device="cpu"))
    quantized = QuantizedForward(model, quantized_weight_names(model, ("lm_head",)), 32)
    with torch.no_grad():
        exact, rounded = forward_logits(model, batch), forward_logits(quantized, batch)
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    picked = [z[:, :-1].gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[scored]
              for z in (exact, rounded)]
    expected = (picked[1] - picked[0]).pow(2).mean().sqrt().item()
    measured = quantization_logit_error(model, iter([batch]), count=1, blocksize=32,
                                        skip_modules=("lm_head",))
    assert measured == pytest.approx(expected, rel=1e-5) and measured > 0


@pytest.mark.parametrize("hinge", ["reference", "alternatives"])
@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_trains_and_records_the_margin(hinge, storage):
    model = tiny_llama(torch.float32 if storage == "fp32" else torch.bfloat16)
    before = snapshot(model)
    result = run_baseline("margin", model, storage=storage, hinge=hinge, lr=1e-2, max_steps=2,
                          blocksize=32)
    assert result.steps == 2 and result.info["margin"] > 0 and result.info["hinge"] == hinge
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_hinge_alone_starts_at_the_margin():
    # θ = θ0 at step 1, so the reference hinge is exactly the margin and nothing else is added.
    result = run_baseline("margin", margin=0.7, ga_weight=0.0, alpha=0.0, lr=1e-2, max_steps=2)
    assert result.losses[0] == pytest.approx(0.7)
    assert result.losses[1] < result.losses[0]


@pytest.mark.parametrize("knobs, message", [
    ({"hinge": "both"}, "hinge must be 'reference' or 'alternatives'"),
    ({"margin": 0.0}, "margin must be > 0 or null"),
    ({"hinge_weight": -1.0}, "hinge_weight must be >= 0"),
])
def test_impossible_settings_fail_before_training(knobs, message):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        run_baseline("margin", model, **knobs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
