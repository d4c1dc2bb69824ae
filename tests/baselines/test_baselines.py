"""The baselines on a tiny random Llama: what each one trains, how parameters are stored, how a
divergence and an impossible setting are reported, and the shared training helpers."""

from __future__ import annotations

import pytest
import torch
from conftest import FORGET_SPLIT as FORGET
from conftest import ROOT, snapshot, tiny_llama
from conftest import SPLIT_TOKENIZER as TOKENIZER
from conftest import run_baseline as run
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from baselines import rmu, sure
from mansu.config import validate_node
from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import collate, text_batches
from mansu.unlearn.checks import UnlearningDiverged
from mansu.unlearn.likelihood import mean_nll, scored_token_counts, sequence_logprobs
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.optimizers import StorageAdamW

CONF = ROOT / "conf"
# One module each; variants of a module (sure_update_mask) are composed by tests/test_config.py.
METHODS = ("none", "ga", "graddiff", "npo", "simnpo", "rmu", "sure", "qat_nf4", "margin")

# FORGET, TOKENIZER, tiny_llama, run and snapshot are conftest's: the tests in tests/baselines share them.


def changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


# ---------------------------------------------------------------------------------------------
# What each method trains


@pytest.mark.parametrize("method, knobs", [
    ("ga", {}), ("graddiff", {"retain_loss": "nll"}), ("graddiff", {"retain_loss": "kl"}),
    ("npo", {"retain_loss": "none"}), ("npo", {"retain_loss": "kl"}), ("simnpo", {}),
])
def test_full_model_methods_train_every_parameter(method, knobs):
    model = tiny_llama()
    before = snapshot(model)
    result = run(method, model, lr=1e-2, max_steps=2, **knobs)
    assert result.steps == 2 and len(result.losses) == 2
    assert changed(before, model) == set(before)
    assert all(p.grad is None for p in model.parameters())  # no stray gradients left behind


def test_train_embeddings_false_keeps_embeddings_and_head():
    model = tiny_llama()
    before = snapshot(model)
    run("ga", model, lr=1e-2, max_steps=2, train_embeddings=False)
    assert changed(before, model) == set(before) - {"model.embed_tokens.weight", "lm_head.weight"}


def test_none_changes_nothing():
    model = tiny_llama()
    before = snapshot(model)
    result = run("none", model)
    assert result.model is model and result.steps == 0 and not changed(before, model)


def test_rmu_trains_only_the_down_projections():
    model = tiny_llama()
    before = snapshot(model)
    result = run("rmu", model, layer_id=1, steering_coeffs=[6.5], alphas=[100.0], lr=1e-2,
                 max_steps=2)
    # Default patterns: the MLP output projection of layers layer_id-2..layer_id (here 0, 1).
    expected = {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert changed(before, model) == expected
    assert set(result.info["trained_names"]) == expected


def test_rmu_brace_patterns():
    model = tiny_llama()
    before = snapshot(model)
    run("rmu", model, layer_id=2, param_patterns=["model.layers.{0,2}.mlp.down_proj.weight"],
        lr=1e-2, max_steps=2)
    assert changed(before, model) == {"model.layers.0.mlp.down_proj.weight",
                                      "model.layers.2.mlp.down_proj.weight"}
    assert rmu.expand_braces("a.{1,2}.{x,y}") == ["a.1.x", "a.1.y", "a.2.x", "a.2.y"]


def test_rmu_defaults_for_gpt2_and_neox_naming():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(TOKENIZER), n_embd=32, n_layer=3, n_head=4,
                                      n_positions=64))
    path, layers = rmu.decoder_layers(gpt2)
    assert rmu.default_param_patterns(path, layers, 2) == [
        f"transformer.h.{i}.mlp.c_proj.weight" for i in (0, 1, 2)]
    before = snapshot(gpt2)
    run("rmu", gpt2, layer_id=1, lr=1e-2, max_steps=2)
    assert changed(before, gpt2) == {"transformer.h.0.mlp.c_proj.weight",
                                     "transformer.h.1.mlp.c_proj.weight"}
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64))
    path, layers = rmu.decoder_layers(neox)
    assert rmu.default_param_patterns(path, layers, 1) == [
        f"gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight" for i in (0, 1)]


def record_selections(monkeypatch, model) -> tuple[list, list]:
    """Patch sure.salient_units to keep each step's masks and the weights it saw them on."""
    selections, states = [], []
    real_salient_units = sure.salient_units

    def recording(params, percentile):
        states.append(snapshot(model))
        selections.append(real_salient_units(params, percentile))
        return selections[-1]

    monkeypatch.setattr(sure, "salient_units", recording)
    return selections, states


def test_sure_update_mask_moves_only_the_selected_rows(monkeypatch):
    model = tiny_llama()
    trained = {n for n, p in model.named_parameters() if p.dim() == 2}
    selections, states = record_selections(monkeypatch, model)
    run("sure", model, mask="update", pool_1d=False, lr=1e-2, max_steps=2, percentile=90.0,
        weight_decay=0.1)
    states.append(snapshot(model))
    names = [n for n, p in model.named_parameters() if n in trained]  # optimizer order
    for step, masks in enumerate(selections):
        kept = 0
        for name, mask in zip(names, masks):
            rows = mask.squeeze(1)
            # Unselected rows are bit-identical across the step, despite momentum and decay.
            assert torch.equal(states[step + 1][name][~rows], states[step][name][~rows])
            kept += int((states[step + 1][name][rows] != states[step][name][rows]).any(1).sum())
        total = sum(m.shape[0] for m in masks)
        assert 0 < kept <= 0.11 * total  # about the top 10% of rows moved
    assert changed(states[0], model) <= trained  # 1-D norm gains are never trained


def test_sure_masks_the_gradient_only_so_adam_momentum_moves_unselected_rows(monkeypatch):
    # The reference's grad.mul_(mask): a row selected at step 1 and not at step 2 has no gradient
    # at step 2, yet Adam's first moment from step 1 moves it; a row never selected never moves
    # (zero moments, no weight decay). 1-D entries are ranked in the same percentile.
    model = tiny_llama()
    selections, states = record_selections(monkeypatch, model)
    run("sure", model, lr=1e-2, max_steps=2, percentile=90.0)
    states.append(snapshot(model))
    names = [n for n, _ in model.named_parameters()]  # every parameter is trained (pool_1d)
    assert len(selections[0]) == len(names)
    units = sum(m.shape[0] for m in selections[0])
    assert 0 < sum(int(m.sum()) for m in selections[0]) <= 0.11 * units
    drifted = 0
    for name, first, second in zip(names, *selections):
        first, second = first.reshape(first.shape[0]), second.reshape(second.shape[0])
        step2 = states[2][name] != states[1][name]
        moved = step2.reshape(step2.shape[0], -1).any(1)
        never = ~first & ~second
        assert not moved[never].any(), name
        drifted += int(moved[first & ~second].sum())
    assert drifted > 0


# ---------------------------------------------------------------------------------------------
# Parameter storage


@pytest.mark.parametrize("storage", ["bf16", "bf16_master"])
def test_bf16_storage_keeps_parameters_bf16(storage):
    result = run("ga", storage=storage, lr=1e-2, max_steps=2)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}


def test_bf16_master_accumulates_steps_that_bf16_rounds_away():
    # With a constant gradient every Adam step has size ≈ lr. Just below 1.0 bf16 values are
    # 2^-8 ≈ 0.0039 apart, so 1 − 1e-3 rounds back to 1.0 at every step of plain bf16; the fp32
    # master reaches 1 − 10·1e-3 = 0.99 and the bf16 weight is that, rounded.
    final = {}
    for storage in ("bf16", "bf16_master"):
        weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        optimizer = StorageAdamW([weight], storage, lr=1e-3)
        for _ in range(10):
            optimizer.zero_grad()
            optimizer.backward(weight.float().sum())
            optimizer.step()
        final[storage] = weight.detach().clone()
        if storage == "bf16_master":
            master = optimizer.stepped[0]
            torch.testing.assert_close(master, torch.full((4,), 0.99), atol=1e-6, rtol=0)
            assert torch.equal(weight, master.to(torch.bfloat16))
    assert torch.equal(final["bf16"], torch.ones(4, dtype=torch.bfloat16))
    assert torch.equal(final["bf16_master"], torch.full((4,), 0.99).to(torch.bfloat16))


def test_bf16_master_moves_more_weights_than_bf16_on_a_model():
    moved = {}
    for storage in ("bf16", "bf16_master"):
        model = tiny_llama(torch.bfloat16)
        before = snapshot(model)
        run("ga", model, storage=storage, lr=2e-5, max_steps=6, weight_decay=0.0)
        moved[storage] = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    assert moved["bf16_master"] > 2 * moved["bf16"]


@pytest.mark.parametrize("storage", ["fp32", "bf16", "bf16_master"])
def test_update_masks_freeze_unselected_rows_despite_momentum_and_decay(storage):
    dtype = RunContext(storage=storage).param_dtype
    weight = torch.nn.Parameter(torch.ones(3, 2, dtype=dtype))
    optimizer = StorageAdamW([weight], storage, lr=0.1, weight_decay=0.5)
    rows = torch.tensor([[True], [False], [True]])
    for keep in (None, rows):  # a full step builds momentum in row 1, then row 1 is masked
        before = weight.detach().clone()
        optimizer.zero_grad()
        optimizer.backward(weight.float().sum())
        optimizer.step(None if keep is None else [keep])
    assert torch.equal(weight[1], before[1]) and not torch.equal(weight[0], before[0])
    if storage == "bf16_master":
        assert torch.equal(optimizer.stepped[0][1].to(dtype), before[1])


def test_storage_dtype_mismatch_is_refused():
    with pytest.raises(ValueError, match="needs torch.bfloat16 parameters"):
        StorageAdamW(list(tiny_llama().parameters()), "bf16", lr=1e-3)


# ---------------------------------------------------------------------------------------------
# Divergence and the stop criterion


def test_huge_lr_raises_diverged_with_the_step():
    with pytest.raises(UnlearningDiverged, match=r"at step \d+"):
        run("ga", lr=1e30, max_steps=5)


def test_planted_inf_raises_at_step_one():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(UnlearningDiverged, match="loss became nan at step 1"):
        run("npo", model, lr=1e-3, max_steps=3)


def test_nan_parameter_after_a_step_is_caught():
    model = tiny_llama()
    params = list(model.parameters())
    optimizer = StorageAdamW(params, "fp32", lr=1e-3)

    def closure():
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
        return torch.tensor(1.0)

    with pytest.raises(UnlearningDiverged, match=r"parameter model\.\S+ became NaN/inf at step 1"):
        run_unlearning(model, TOKENIZER, FORGET, RunContext(), optimizer, closure, max_steps=3)


def test_stop_forget_acc_stops_and_records_the_trace():
    # Any accuracy is <= 1.0, so the first evaluation (after step 2) stops the run.
    result = run("ga", lr=1e-3, max_steps=10, stop_forget_acc=1.0, eval_every=2)
    assert result.steps == 2 and result.info["stopped_early"] is True
    assert [step for step, _ in result.info["forget_acc_trace"]] == [2]


# ---------------------------------------------------------------------------------------------
# Impossible settings


@pytest.mark.parametrize("method, knobs, message", [
    ("rmu", {"layer_id": 3}, "beyond the model's depth"),
    ("rmu", {"layer_id": 1, "param_patterns": ["model.layers.*.mlp.nope"]}, "matches no parameter"),
    ("rmu", {"layer_id": 1, "steering_coeffs": [6.5, 6.5]}, "one value per forget topic"),
    ("npo", {"beta": 0.0}, "beta must be > 0"),
    ("simnpo", {"beta": -1.0}, "beta must be > 0"),
    ("ga", {"lr": 0.0}, "lr must be > 0"),
    ("graddiff", {"lr": -1e-5}, "lr must be > 0"),
    ("sure", {"percentile": 0.0}, r"percentile must be in \(0, 100\)"),
    ("sure", {"percentile": 100.0}, r"percentile must be in \(0, 100\)"),
    ("ga", {"stop_forget_acc": 1.5}, r"stop_forget_acc must be in \[0, 1\]"),
])
def test_impossible_settings_fail_before_training(method, knobs, message):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        run(method, model, **knobs)
    assert not changed(before, model)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_empty_forget_corpus_is_refused(method):
    with pytest.raises(ValueError, match="forget corpus is empty"):
        run(method, forget=Split(FORGET.questions, []))


# ---------------------------------------------------------------------------------------------
# Configs and training helpers


@pytest.mark.parametrize("method", METHODS)
def test_method_configs_fit_their_code(method):
    node = OmegaConf.load(CONF / "method" / f"{method}.yaml")
    validate_node(node, "method")
    tuning = CONF / "tuning" / f"tiny_{method}.yaml"
    if tuning.exists():
        assert tuning.read_text().startswith("# @package _global_\n")
        validate_node(OmegaConf.merge(node, OmegaConf.load(tuning).method), "method")


def test_collate_masks_padding_out_of_the_labels():
    batch = collate([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_likelihood_helpers_agree_with_hugging_face():
    model = tiny_llama()
    batch = next(text_batches(TOKENIZER, FORGET.corpus, batch_size=3, seed=0, device="cpu"))
    hf_loss = model(**batch).loss
    torch.testing.assert_close(mean_nll(model, batch), hf_loss)
    total = sequence_logprobs(model, batch).sum()
    torch.testing.assert_close(-total / scored_token_counts(batch).sum(), hf_loss)


def test_text_batches_cycle_through_every_text_each_pass():
    stream = text_batches(TOKENIZER, FORGET.corpus, batch_size=3, seed=1, device="cpu")
    first_pass = [next(stream) for _ in range(2)]  # 4 texts: batches of 3 and 1
    assert [b["input_ids"].shape[0] for b in first_pass] == [3, 1]
    seen = {tuple(ids[m.bool()].tolist()) for b in first_pass
            for ids, m in zip(b["input_ids"], b["attention_mask"])}
    assert seen == {tuple(TOKENIZER(t)["input_ids"]) for t in FORGET.corpus}
    again = text_batches(TOKENIZER, FORGET.corpus, batch_size=3, seed=1, device="cpu")
    assert torch.equal(next(again)["input_ids"], first_pass[0]["input_ids"])  # seeded


def test_frozen_reference_is_not_trained_by_npo():
    model = tiny_llama()
    result = run("npo", model, lr=1e-2, max_steps=2, retain_loss="none")
    # Step 1 starts at θ = θ_ref, so its log-ratio is 0 and the loss is (2/β)·ln2.
    assert result.losses[0] == pytest.approx(2 / 0.1 * torch.log(torch.tensor(2.0)).item())
    assert result.losses[1] != pytest.approx(result.losses[0])


def test_rmu_control_vector_is_seeded():
    losses = [run("rmu", layer_id=1, lr=1e-3, max_steps=2).losses for _ in range(2)]
    assert losses[0] == losses[1]
