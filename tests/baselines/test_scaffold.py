"""The shared training scaffold (mansu.unlearn.scaffold): the signature ``baseline`` builds is the
config's schema, the shared checks run first, and ``Training`` draws the same seeded batches and
records the same info as the baselines did when each one spelled the scaffold out."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing

import pytest
import torch
from conftest import FORGET_SPLIT, RETAIN_SPLIT, SPLIT_TOKENIZER, run_baseline, tiny_llama
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mansu.config import ConfigError, knobs_of, validate_node
from mansu.context import RunContext
from mansu.unlearn.batches import split_batches
from mansu.unlearn.checks import UnlearnResult
from mansu.unlearn.scaffold import KNOB_HINTS, Knobs, Training, baseline

TRAINED = ("ga", "graddiff", "npo", "simnpo", "rmu", "sure", "qat_nf4", "margin")
SHARED = [f.name for f in dataclasses.fields(Knobs)]
# The shared knobs' defaults a baseline changes, and the ones it leaves out.
CHANGED = {"rmu": {"lr": 5e-5, "max_steps": 150}, "sure": {"weight_decay": 0.0}}
LEFT_OUT = {"rmu": {"loss_tokens", "train_embeddings"}}


def unlearn_of(method: str):
    return importlib.import_module(f"baselines.{method}").unlearn


@pytest.mark.parametrize("method", TRAINED)
def test_the_signature_lists_the_shared_knobs_after_the_methods_own(method):
    knobs, hints = knobs_of(unlearn_of(method))
    names = list(knobs)
    expected = [n for n in SHARED if n not in LEFT_OUT.get(method, set())]
    assert names[-len(expected):] == expected  # its own knobs first, then the shared ones
    for name in expected:
        default = CHANGED.get(method, {}).get(name, getattr(Knobs(), name))
        assert knobs[name].default == default and hints[name] == KNOB_HINTS[name], name
    assert set(names[:-len(expected)]).isdisjoint(SHARED)
    assert hints["return"] is UnlearnResult and unlearn_of(method).__name__ == "unlearn"
    assert list(inspect.signature(unlearn_of(method)).parameters)[:5] == [
        "model", "tokenizer", "forget", "retain", "ctx"]


@pytest.mark.parametrize("node, message", [
    ({"weight_decy": 0.1}, r"method\.weight_decy: unknown key .*did you mean 'weight_decay'"),
    ({"lr": "abc"}, r"method\.lr: expected float, got 'abc'"),
    ({"loss_tokens": "some"}, r"method\.loss_tokens: expected 'answer' \| 'all'"),
    ({"percentile": "high"}, r"method\.percentile: expected float"),
])
def test_config_validation_reads_the_built_signature(node, message):
    with pytest.raises(ConfigError, match=message):
        validate_node(OmegaConf.create({"_target_": "baselines.sure.unlearn", "_partial_": True,
                                        **node}), "method")


def test_a_left_out_knob_is_an_unknown_key():
    node = OmegaConf.create({"_target_": "baselines.rmu.unlearn", "loss_tokens": "all"})
    with pytest.raises(ConfigError, match=r"method\.loss_tokens: unknown key"):
        validate_node(node, "method")


def test_hydra_partial_calls_the_built_signature():
    fn = instantiate(OmegaConf.create({"_target_": "baselines.ga.unlearn", "_partial_": True,
                                       "lr": 1e-2, "max_steps": 1}))
    result = fn(tiny_llama(), SPLIT_TOKENIZER, FORGET_SPLIT, RETAIN_SPLIT, RunContext())
    assert result.steps == 1
    with pytest.raises(TypeError, match="lrr"):
        unlearn_of("ga")(tiny_llama(), SPLIT_TOKENIZER, FORGET_SPLIT, RETAIN_SPLIT, RunContext(),
                         lrr=1e-2)


def test_the_shared_checks_run_before_the_method():
    calls = []

    @baseline("toy")
    def unlearn(training: Training, *, scale: float = 1.0) -> UnlearnResult:
        calls.append(scale)
        return UnlearnResult(training.model, 0, [])

    with pytest.raises(ValueError, match="toy: lr must be > 0, got 0.0"):
        unlearn(tiny_llama(), SPLIT_TOKENIZER, FORGET_SPLIT, RETAIN_SPLIT, RunContext(), lr=0.0)
    assert calls == []
    unlearn(tiny_llama(), SPLIT_TOKENIZER, FORGET_SPLIT, RETAIN_SPLIT, RunContext(), scale=2.0)
    assert calls == [2.0]
    assert typing.get_type_hints(unlearn)["scale"] is float


@pytest.mark.parametrize("decorate, message", [
    (lambda: baseline("x", lrr=1e-3), "no shared knob"),
    (lambda: baseline("x", without=("loss_token",)), "no shared knob"),
    (lambda: baseline("x", lr=1e-3, without=("lr",)), "both given a default and left out"),
    (lambda: baseline("x")(lambda training, *, lr=1e-3: None), "are shared knobs"),
    (lambda: baseline("x")(lambda training, *, ctx=None: None), "name the stage's inputs"),
])
def test_a_misdeclared_baseline_fails_at_import(decorate, message):
    with pytest.raises(TypeError, match=message):
        decorate()


def test_train_draws_seeded_forget_and_optional_retain_batches():
    seen = []
    ctx = RunContext(seed=5)

    @baseline("toy")
    def unlearn(training: Training, *, use_retain: bool = False) -> UnlearnResult:
        def loss(forget_batch, retain_batch):
            seen.append((forget_batch, retain_batch))
            return -training.model(**forget_batch).loss
        return training.train(loss, retain=use_retain, info={"mine": 1})

    result = unlearn(tiny_llama(), SPLIT_TOKENIZER, FORGET_SPLIT, RETAIN_SPLIT, ctx, lr=1e-3,
                     max_steps=2, batch_size=3, use_retain=True)
    forget = split_batches(SPLIT_TOKENIZER, FORGET_SPLIT, loss_tokens="answer", batch_size=3,
                           seed=5, device="cpu")
    retain = split_batches(SPLIT_TOKENIZER, RETAIN_SPLIT, loss_tokens="answer", batch_size=3,
                           seed=6, device="cpu")
    for forget_batch, retain_batch in seen:
        assert torch.equal(forget_batch["input_ids"], next(forget)["input_ids"])
        assert torch.equal(retain_batch["input_ids"], next(retain)["input_ids"])
    assert list(result.info)[-2:] == ["mine", "loss_tokens"]
    seen.clear()
    unlearn(tiny_llama(), SPLIT_TOKENIZER, FORGET_SPLIT, RETAIN_SPLIT, ctx, lr=1e-3, max_steps=1)
    assert seen[0][1] is None


def test_loss_tokens_is_recorded_where_it_is_a_knob():
    assert run_baseline("ga", lr=1e-3, max_steps=1).info["loss_tokens"] == "answer"
    assert "loss_tokens" not in run_baseline("rmu", layer_id=1, lr=1e-3, max_steps=1).info
