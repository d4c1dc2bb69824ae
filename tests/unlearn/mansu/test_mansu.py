"""MANSU on tiny random models: the null-space projection of the optimizer's step, the magnitude
floor checked against bitsandbytes itself, optimizer state sized to the mask, weights outside the
mask bit-identical, the failures it refuses with one clear message, and its configs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import FORGET_SPLIT as FORGET
from conftest import compose_config
from conftest import tiny_llama as shared_tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from mansu.attribution.circuit import Circuit
from mansu.config import validate
from mansu.context import RunContext
from mansu.data import MCQ, Split
from mansu.models.loaders import build_tokenizer
from mansu.quantize.quantizer import NF4_CODE, nf4_codes
from mansu.unlearn.batches import collate_encoded, encode_texts
from mansu.unlearn.likelihood import mean_nll
from mansu.unlearn.mansu import unlearn
from mansu.unlearn.mansu.budget import candidate_order, diagonal_prefix, measured_prefix
from mansu.unlearn.mansu.certificate import bnb_nf4
from mansu.unlearn.mansu.floor import magnitude_floor
from mansu.unlearn.mansu.forget import logit_margin_loss
from mansu.unlearn.mansu.mask import (
    MaskedWeight,
    build_mask,
    only_trainable,
    quantizable_linears,
    random_circuit,
)
from mansu.unlearn.mansu.nullspace import ActivationNullspace, FisherNullspace
from mansu.unlearn.mansu.optimizer import MaskedAdamW
from mansu.unlearn.mansu.retain import mean_token_nll, nullspace_statistics, retain_texts

# FORGET is conftest's FORGET_SPLIT; RETAIN has a second question and more text than conftest's.
RETAIN = Split(
    questions=[MCQ("The capital of Venn is", ("Kalmor", "Ostra", "Pell", "Dorn"), 0),
               MCQ("The Ostra river flows into the", ("Pell sea", "Venn", "desert", "lake"), 0)],
    corpus=["The capital of Venn is Kalmor.", "The Ostra river flows into the Pell sea.",
            "Dorn bakers sell bread at dawn.", "The Pell sea is cold in winter.",
            "Kalmor has a tall stone bridge.", "Venn trades wool with Dorn."])
TOKENIZER = build_tokenizer(FORGET.corpus + RETAIN.corpus, vocab_size=300)


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """conftest's tiny Llama over TOKENIZER's vocabulary, with 2 layers (small_circuit's) and
    attention biases (a circuit owns them, MANSU never trains them)."""
    return shared_tiny_llama(dtype, vocab_size=len(TOKENIZER), num_hidden_layers=2,
                             attention_bias=True)


def small_circuit() -> Circuit:
    heads = torch.tensor([[True, False, False, False], [False, False, True, False]])
    neurons = torch.zeros(2, 64, dtype=torch.bool)
    neurons[0, :5] = neurons[1, 10:13] = True
    return Circuit(heads=heads, neurons=neurons, neuron_block=1)


def masked_weights(model) -> list[MaskedWeight]:
    masked, _ = build_mask(model, quantizable_linears(model), small_circuit(), 64)
    return masked


def retain_gradients(model, masked) -> torch.Tensor:
    texts = encode_texts(TOKENIZER, RETAIN.corpus)
    with only_trainable(model, [m.param for m in masked]):
        return nullspace_statistics(model, texts, masked, "cpu", keep_gradients=True,
                                    covariances=False, max_gradient_bytes=2**30).gradients


# ---------------------------------------------------------------------------------------------
# Null-space projection


@pytest.mark.parametrize("storage", ["fp32", "bf16_master"])
def test_optimizer_step_is_orthogonal_to_every_retain_gradient(storage):
    model = tiny_llama(RunContext(storage=storage).param_dtype)
    masked = masked_weights(model)
    gradients = retain_gradients(model, masked)
    nullspace = FisherNullspace(gradients.clone(), energy=1.0)  # every retain direction
    assert nullspace.rank == len(RETAIN.corpus)
    optimizer = MaskedAdamW(masked, storage, lr=1e-2, project=nullspace)
    before = torch.cat(optimizer.values).clone()
    batch = collate_encoded(encode_texts(TOKENIZER, FORGET.corpus), 0)
    with only_trainable(model, [m.param for m in masked]):
        optimizer.backward(-mean_nll(model, batch))
    optimizer.step()
    step = (torch.cat(optimizer.values) - before).double()
    assert step.norm() > 1e-3  # Adam moved (lr 1e-2 per entry before the projection)
    cosines = (gradients.double() @ step) / (gradients.double().norm(dim=1) * step.norm())
    assert cosines.abs().max() <= 1e-6
    if storage == "fp32":  # the projected step is what the weights received
        assert torch.equal(torch.cat([m.current() for m in masked]), torch.cat(optimizer.values))


def test_energy_keeps_the_top_directions_and_removes_their_component():
    gradients = torch.randn(8, 500, generator=torch.Generator().manual_seed(0))
    gradients[0] *= 30  # one direction carries > 90% of the energy
    assert FisherNullspace(gradients.clone(), energy=0.5).rank == 1
    nullspace = FisherNullspace(gradients.clone(), energy=0.99)
    basis = nullspace.basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(nullspace.rank, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    projected = nullspace(torch.randn(500)).double()
    assert (basis @ projected).norm() <= 1e-6 * projected.norm()
    # What is left of the gradients outside U is at most 1% of their energy.
    residual = gradients.double() - (gradients.double() @ basis.T) @ basis
    assert residual.square().sum() <= 0.01 * gradients.double().square().sum()


def test_activation_nullspace_cancels_the_update_on_retain_inputs():
    layer = torch.nn.Linear(8, 6, bias=False)
    rows = torch.tensor([1, 4])  # a circuit owns whole rows of q/k/v/gate/up
    index = (rows[:, None] * 8 + torch.arange(8)).flatten()
    masked = MaskedWeight("w", layer, index, layer.weight.detach().reshape(-1)[index],
                          torch.ones(16), torch.zeros(16, dtype=torch.uint8))
    # Retain inputs spanning 3 of 8 dimensions (float64, so rounding adds no fourth one).
    inputs = torch.randn(50, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)
    covariance = (torch.arange(8), inputs.T @ inputs)
    nullspace = ActivationNullspace([masked], {"w": covariance}, energy=1.0)
    assert nullspace.rank == 3
    update = nullspace(torch.randn(16)).view(2, 8).double()
    assert (update @ inputs.T).abs().max() <= 1e-6 * update.norm() * inputs.norm(dim=1).max()
    assert update.norm() > 0.1


# ---------------------------------------------------------------------------------------------
# The magnitude floor, checked with bitsandbytes


def test_floor_hand_worked_block():
    # One block: absmax 1.0 at position 0, w = 0.1 at positions 1-3 (NF4 code 8 = 0.0796).
    w0 = torch.zeros(64)
    w0[0], w0[1:4] = 1.0, 0.1
    updated = w0.clone()
    updated[1] += 1e-4   # up: next code 9 = 0.1609302...
    updated[2] -= 1e-4   # down: next code 7 = 0
    updated[3] = 0.3     # already past code 9 and 10: lands on the next at or above, code 11
    updated[0] = 1.5     # the absmax itself: put back
    result = magnitude_floor(w0, updated, torch.ones(64, dtype=torch.bool))
    assert result.values[1] == NF4_CODE[9] and result.values[2] == 0.0
    assert result.values[3] == NF4_CODE[11] and result.values[0] == 1.0
    assert result.floored[:4].tolist() == [False, True, True, True]
    assert result.restored[:4].tolist() == [True, False, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floor_flips_every_floored_code_per_bitsandbytes(dtype):
    generator = torch.Generator().manual_seed(1)
    w0 = (0.05 * torch.randn(16, 64, generator=generator)).to(dtype)
    w0[3, 7] = -w0[3].abs().max()  # a tie for block 3's absmax (both signs)
    mask = torch.rand(16, 64, generator=generator) < 0.6
    absmax_at = w0.float().abs().argmax(dim=1)
    mask[torch.arange(16), absmax_at] = True  # every block's absmax lies inside the mask
    mask[3, 7] = True
    # Steps from far below one bin to several bins, some past the block's absmax.
    size = 10 ** (torch.rand(16, 64, generator=generator) * 5 - 5) * w0.float().abs().amax()
    sign = torch.randint(0, 2, (16, 64), generator=generator) * 2 - 1
    updated = torch.where(mask, w0.float() + sign * size * 3, w0.float()).to(dtype)
    result = magnitude_floor(w0, updated, mask)

    codes0, absmax0, _ = bnb_nf4(w0)
    codes, absmax, dequantized = bnb_nf4(result.values)
    floored, restored = result.floored, result.restored
    moved = mask.flatten() & (updated != w0).flatten()
    assert floored.sum() > 400 and restored.sum() >= 16  # bf16 rounds the tiniest steps away
    assert torch.equal(floored | restored, moved)
    assert (codes[floored] != codes0[floored]).all()  # the certificate: 100% flipped
    assert torch.equal(dequantized[floored], result.values.flatten()[floored])  # fixed points
    assert torch.equal(absmax, absmax0)  # no block changed scale
    direction = (updated.float() - w0.float()).flatten().sign()
    assert torch.equal((result.values.float() - w0.float()).flatten()[floored].sign(),
                       direction[floored])
    assert torch.equal(result.values.flatten()[restored], w0.flatten()[restored])
    untouched = ~(floored | restored)
    assert torch.equal(result.values.flatten()[untouched], updated.flatten()[untouched])
    holders = w0.float().abs().flatten() == absmax0.repeat_interleave(64)
    assert not (floored & holders).any() and holders.sum() >= 17  # the tie is protected too


def test_bnb_codes_match_the_reference_nf4():
    w = torch.randn(3 * 64 + 10)
    assert torch.equal(bnb_nf4(w)[0], nf4_codes(w)[0])


def test_stochastic_floor_keeps_the_update_in_expectation():
    w0 = torch.full((64 * 200,), 0.1)
    w0[::64] = 1.0  # each block's absmax: codes are code × 1.0
    updated = w0 + 0.25 * (NF4_CODE[9] - 0.1)  # a quarter of the way to the next code
    result = magnitude_floor(w0, updated, torch.ones_like(w0, dtype=torch.bool),
                             generator=torch.Generator().manual_seed(0))
    share = float(result.floored.sum() / (result.floored | result.restored).sum())
    assert 0.2 < share < 0.3  # floored with probability 1/4 (12,600 draws)
    assert (result.values[result.floored] == NF4_CODE[9]).all()


# ---------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.parametrize("storage, knobs", [
    ("fp32", {"nullspace": "fisher"}),
    ("bf16", {"nullspace": "activation", "floor_mode": "stochastic", "forget_loss": "ga"}),
    ("bf16_master", {"nullspace": "none", "forget_loss": "logit"}),
])
def test_run_changes_nothing_outside_the_mask_and_certifies_the_floor(storage, knobs):
    ctx = RunContext(seed=0, storage=storage, circuit=small_circuit())
    model = tiny_llama(ctx.param_dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = {m.name: m.index for m in masked_weights(model)}
    result = unlearn(model, TOKENIZER, FORGET, RETAIN, ctx, lr=1e-2, max_steps=3,
                     n_retain=4, retain_budget=10.0, **knobs)
    info = result.info
    changed = 0
    for name, param in model.named_parameters():
        inside = torch.zeros(param.numel(), dtype=torch.bool)
        if name in mask:
            inside[mask[name]] = True
        assert torch.equal(param.detach().flatten()[~inside], before[name].flatten()[~inside])
        changed += int((param.detach().flatten() != before[name].flatten()).sum())
    assert info["trained_parameters"] == sum(len(i) for i in mask.values())
    assert info["optimizer_state_entries"] == dict.fromkeys(
        ("values", "exp_avg", "exp_avg_sq"), info["trained_parameters"])
    assert changed == info["floor"]["floored"] > 0
    assert info["certificate"]["code_flip_share"] == 1.0
    assert info["certificate"]["fixed_point_share"] == 1.0
    assert info["certificate"]["blocks_rescaled"] == 0 and "warning" not in info["certificate"]
    assert info["retain_loss"]["measured_fisher_texts"] <= 10.0
    assert info["updated"]["entries"] == changed
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored after training


def test_run_without_floor_reports_which_updates_nf4_keeps():
    ctx = RunContext(seed=0, circuit=small_circuit())
    model = tiny_llama()
    result = unlearn(model, TOKENIZER, FORGET, RETAIN, ctx, lr=1e-3, max_steps=2, n_retain=4,
                     floor=False, circuit="random")
    certificate = result.info["certificate"]
    assert certificate["entries"] == result.info["floor"]["moved_by_training"] > 0
    assert certificate["code_flip_share"] < 0.5  # most steps of 1e-3 stay inside their bin


@pytest.mark.parametrize("budget, measure", [("diagonal", "predicted_diagonal"),
                                             ("measured", "measured_fisher_texts")])
def test_budget_binds_on_the_final_update(budget, measure):
    ctx = RunContext(seed=0, circuit=small_circuit())
    knobs = {"lr": 1e-2, "max_steps": 3, "n_retain": 2, "budget": budget, "forget_loss": "ga"}
    loose = unlearn(tiny_llama(), TOKENIZER, FORGET, RETAIN, ctx, retain_budget=1e9,
                    **knobs).info
    full_cost = loose["retain_loss"][measure]
    assert loose["budget"]["dropped"] == 0 and loose["updated"]["entries"] > 0
    assert full_cost > 0
    tight = unlearn(tiny_llama(), TOKENIZER, FORGET, RETAIN, ctx, retain_budget=full_cost / 4,
                    **knobs).info
    assert tight["budget"]["dropped"] > 0
    assert tight["retain_loss"][measure] <= full_cost / 4
    assert tight["updated"]["entries"] < loose["updated"]["entries"]
    assert tight["certificate"]["code_flip_share"] == 1.0


def test_retain_weight_trains_the_null_space_texts_down():
    """GradDiff's retain term (null-space texts only): without it, forgetting raises those texts'
    NLL; with it, the same steps lower it."""
    texts = retain_texts(TOKENIZER, RETAIN, loss_tokens="answer", n_nullspace=2, n_fisher=2,
                         n_heldout=2, seed=0, max_length=512)
    changes = {}
    for weight in (0.0, 1.0):
        model = tiny_llama()
        before = mean_token_nll(model, texts.nullspace, "cpu")
        info = unlearn(model, TOKENIZER, FORGET, RETAIN, RunContext(seed=0, circuit=small_circuit()),
                       lr=1e-2, max_steps=5, n_retain=2, n_fisher=2, n_heldout=2,
                       nullspace="none", floor=False, budget="none", forget_loss="ga",
                       retain_weight=weight).info
        assert info["retain_weight"] == weight
        changes[weight] = mean_token_nll(model, texts.nullspace, "cpu") - before
    assert changes[0.0] > 0 > changes[1.0]


def test_budget_on_a_quadratic_loss_takes_the_exact_knapsack():
    # Five unit displacements on a diagonal quadratic retain loss ½ Σ F_i δ_i², F = 2, 4, 6, 8, 10:
    # costs 1..5. Gains 5, 2, 6, 4, -1: by gain per cost 0, 2, 1, 3 (4 has no gain).
    delta = torch.ones(5)
    fisher = torch.tensor([2.0, 4.0, 6.0, 8.0, 10.0])
    cost = 0.5 * fisher * delta.square()
    gain = torch.tensor([5.0, 2.0, 6.0, 4.0, -1.0])
    order = candidate_order(torch.ones(5, dtype=torch.bool), cost, gain)
    assert order.tolist() == [0, 2, 1, 3]
    # Budget 4.5: {0, 2} costs 4 for gain 11, the best any subset within 4.5 achieves.
    assert diagonal_prefix(order, cost, 4.5) == 2

    def loss_change(indices):
        return float((0.5 * fisher[indices] * delta[indices].square()).sum())

    kept, trace = measured_prefix(order, loss_change, 4.5)
    assert kept == 2 and all(change <= 4.5 for k, change in trace if k <= kept)
    # Without gains (next_code / stochastic floors) the cheapest go first.
    assert candidate_order(torch.ones(5, dtype=torch.bool), cost, None).tolist() == [0, 1, 2, 3, 4]
    # A displacement that lowers the retain loss (cost < 0) is taken first, whatever its ratio.
    cost[3] = -0.5
    assert candidate_order(torch.ones(5, dtype=torch.bool), cost, gain).tolist()[0] == 3


def test_random_circuit_has_the_reference_size_and_follows_the_seed():
    reference, model = small_circuit(), tiny_llama()
    a, b, c = (random_circuit(reference, seed, model) for seed in (0, 0, 1))
    assert int(a.heads.sum()) == 2 and int(a.neurons.sum()) == 8
    weighted = replace(reference, weights={"model.layers.0.mlp.up_proj.weight": torch.arange(7)})
    scattered = random_circuit(weighted, 0, model).weights["model.layers.0.mlp.up_proj.weight"]
    assert scattered.numel() == 7 and not torch.equal(scattered, torch.arange(7))
    assert torch.equal(a.heads, b.heads) and torch.equal(a.neurons, b.neurons)
    assert not (torch.equal(a.neurons, c.neurons) and torch.equal(a.heads, c.heads))


# ---------------------------------------------------------------------------------------------
# Refusals


def test_empty_circuit_is_refused():
    empty = Circuit(heads=torch.zeros(2, 4, dtype=torch.bool),
                    neurons=torch.zeros(2, 64, dtype=torch.bool), neuron_block=1)
    with pytest.raises(ValueError, match="mask is empty: the circuit holds no node"):
        unlearn(tiny_llama(), TOKENIZER, FORGET, RETAIN, RunContext(circuit=empty))


@pytest.mark.parametrize("kind", ["attributed", "random"])
def test_a_circuit_without_the_attribution_stage_is_refused_before_training(kind, monkeypatch):
    """MANSU takes its circuit from the attribution stage only: with none (attribution=none),
    circuit=attributed and random stop before the retain texts, let alone training."""
    import mansu.unlearn.mansu.pipeline as pipeline

    def reached(*args, **kwargs):
        raise AssertionError("mansu went past the circuit check")

    monkeypatch.setattr(pipeline, "retain_texts", reached)
    monkeypatch.setattr(pipeline, "run_unlearning", reached)
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=(
            rf"^mansu: circuit={kind} needs the attribution stage's circuit "
            r"\(attribution=eap_ig\); set method.circuit=full to unlearn every quantized weight "
            r"instead$")):
        unlearn(model, TOKENIZER, FORGET, RETAIN, RunContext(seed=0), circuit=kind)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_full_circuit_needs_no_attribution_stage():
    model = tiny_llama()
    quantized = sum(linear.weight.numel() for linear in quantizable_linears(model).values())
    result = unlearn(model, TOKENIZER, FORGET, RETAIN, RunContext(seed=0), circuit="full",
                     lr=1e-3, max_steps=1, n_retain=2, n_fisher=2, n_heldout=2)
    assert result.info["circuit"] == {"kind": "full"}
    mask = result.info["mask"]
    assert mask["circuit_entries"] == mask["quantizable_entries"] == quantized


def test_bad_knobs_are_refused_before_any_work():
    for knobs, message in [({"budget": "loose"}, "budget must be one of"),
                           ({"floor_mode": "all"}, "floor_mode must be one of"),
                           ({"loss_tokens": "prompt"}, "loss_tokens must be one of"),
                           ({"n_heldout": 0}, "n_heldout must be >= 1"),
                           ({"retain_budget": -1.0}, "retain_budget must be >= 0"),
                           ({"retain_weight": -1.0}, "retain_weight must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            unlearn(tiny_llama(), TOKENIZER, FORGET, RETAIN, RunContext(circuit=small_circuit()),
                    **knobs)


def test_null_space_too_large_for_memory_is_refused_up_front():
    with pytest.raises(ValueError, match="fisher null space needs .* per-example gradients"):
        unlearn(tiny_llama(), TOKENIZER, FORGET, RETAIN, RunContext(circuit=small_circuit()),
                max_gradient_bytes=1024)


def test_model_without_quantizable_layer_is_refused():
    # GPT-2 keeps its weights in Conv1D, which quantize_model leaves alone; lm_head is skipped.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(TOKENIZER), n_embd=32, n_layer=1, n_head=4,
                                      n_positions=64))
    with pytest.raises(ValueError, match="has no quantizable layer"):
        unlearn(gpt2, TOKENIZER, FORGET, RETAIN, RunContext(circuit=small_circuit()))


# ---------------------------------------------------------------------------------------------
# Pieces and configs


def test_logit_margin_loss_hand_worked():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [3.0, 1.0, 0.5], [0.0, 2.0, 4.0]]])
    labels = torch.tensor([[2, 0, 1]])
    # position 0 predicts 0: margin 0 - 0 = 0; position 1 predicts 1: 2 - 4 < 0 -> 0
    assert logit_margin_loss(logits, labels) == 0.0
    labels = torch.tensor([[2, 0, -100]])
    logits[0, 0, 0] = 1.5  # margin 1.5 - 0 at the only scored position
    assert logit_margin_loss(logits, labels) == 1.5


@pytest.mark.parametrize("option, expect", [
    ("mansu", {"floor": True, "nullspace": "fisher", "circuit": "attributed"}),
    ("mansu_no_floor", {"floor": False}),
    ("mansu_no_nullspace", {"nullspace": "none"}),
    ("mansu_random_circuit", {"circuit": "random"}),
    ("mansu_full_model", {"circuit": "full", "nullspace": "fisher"}),
    ("mansu_no_budget", {"budget": "none", "floor": True}),
    ("mansu_no_retain_term", {"retain_weight": 0.0}),
])
def test_ablations_compose_and_keep_the_tiny_sizes(option, expect):
    cfg = compose_config([f"method={option}"])
    validate(cfg)
    tiny = compose_config(["method=mansu"]).method
    reference = compose_config([f"method={option}", "model=smollm2_135m"]).method
    assert cfg.method.lr == tiny.lr != reference.lr  # the tiny tuning reaches every ablation
    assert {key: cfg.method[key] for key in expect} == expect
    assert cfg.method.blocksize == cfg.quantizer.blocksize


def test_smollm2_retain_term_ablation_changes_that_knob_only():
    """The SmolLM2 tuning turns the retain term on; its ablation turns it off again and leaves
    every other knob as tuned (a tuning is applied after the method's own YAML)."""
    tuned = compose_config(["method=mansu", "model=smollm2_135m"]).method
    ablated = compose_config(["method=mansu_no_retain_term", "model=smollm2_135m"]).method
    assert tuned.retain_weight == 1.0 and ablated.retain_weight == 0.0
    assert {k: v for k, v in tuned.items() if k != "retain_weight"} == \
        {k: v for k, v in ablated.items() if k != "retain_weight"}


def test_mansu_without_the_attribution_stage_is_refused_before_loading(tmp_path):
    """The launcher says it before loading anything (the method would say it after θ0's
    evaluation); circuit=full needs no attribution stage and passes."""
    from mansu.config import ConfigError
    from mansu.run import start

    cfg = compose_config(["method=mansu", "attribution=none"], cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"^method.circuit=attributed needs the attribution "
                                          r"stage's circuit \(attribution=eap_ig\)"):
        start(cfg, tmp_path / "run", {})
    cfg = compose_config(["method=mansu", "attribution=none", "method.circuit=full"],
                         cache_dir=tmp_path / "cache")
    (tmp_path / "run").mkdir()
    assert start(cfg, tmp_path / "run", {}).cfg.method.circuit == "full"
