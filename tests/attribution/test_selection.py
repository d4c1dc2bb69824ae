"""The necessity selection rule (mansu.attribution.selection.necessity, mansu.attribution.saliency)
on a hand-built model whose facts live in known neurons: one-hot embeddings, attention and every
other neuron silenced, and in layer 1 one neuron per fact (it reads the subject and writes the
answer) plus a shared neuron that reads every subject and writes every answer, forget and retain
alike."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mansu.attribution.circuit import parameter_mask
from mansu.attribution.eap_ig import attribute
from mansu.attribution.selection import select
from mansu.attribution.selection.necessity import select_necessary
from mansu.data import MCQ

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORGET = [MCQ("the virus veltrax", ("ticks", "bats", "rats", "fleas"), 0),
          MCQ("the virus zorim", ("liver", "lungs", "heart", "skin"), 1)]
RETAIN = [MCQ("the city brano", ("desert", "lagoon", "marsh", "delta"), 1),
          MCQ("the artist kloum", ("horses", "storms", "towers", "dancers"), 3)]
NEUTRAL = "plain words only"
WORDS = sorted({w for q in FORGET + RETAIN for w in (*q.question.split(), *q.choices)}
               | set(NEUTRAL.split()) | {"[UNK]"})
HIDDEN, N_NEURONS = 64, 16
SHARED, OWN = 0, {"veltrax": 1, "zorim": 2, "brano": 3, "kloum": 4}  # layer-1 neuron of each fact
SETTINGS = dict(scoring="cloze", neutral_stem=NEUTRAL, progress=False)


def make_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[UNK]")


def fact_model():
    """Each word has its own residual dimension; subject s_i's neuron adds 0.3 (shared: 0.5, for
    every fact) of answer a_i's direction, read out by an identity unembedding."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=N_NEURONS, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, initializer_range=0.02,
        tie_word_embeddings=False)).eval()
    index = {w: i for i, w in enumerate(WORDS)}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(5.0 * torch.eye(len(WORDS), HIDDEN))
        model.lm_head.weight.copy_(10.0 * torch.eye(len(WORDS), HIDDEN))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        mlp = model.model.layers[1].mlp
        # The normalized residual holds 8 on the subject's dimension: gate = up = 2, act = silu(2) 2.
        act = 2.0 * torch.nn.functional.silu(torch.tensor(2.0))
        for q in FORGET + RETAIN:
            subject, answer = index[q.question.split()[-1]], index[q.choices[q.answer]]
            for neuron, strength in ((OWN[q.question.split()[-1]], 0.3), (SHARED, 0.5)):
                mlp.gate_proj.weight[neuron, subject] = 0.25
                mlp.up_proj.weight[neuron, subject] = 0.25
                mlp.down_proj.weight[answer, neuron] = strength / act
    return model


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = fact_model(), make_tokenizer()
    attr_f = attribute(model, tokenizer, FORGET, **SETTINGS)
    attr_r = attribute(model, tokenizer, RETAIN, **SETTINGS)
    return model, tokenizer, attr_f, attr_r


def neuron_node(neuron: int, layer: int = 1) -> int:
    return 2 * 4 + layer * N_NEURONS + neuron  # heads first, then neurons, layer-major


def test_the_shared_neuron_ranks_first_but_carries_retain(setup):
    _, _, attr_f, attr_r = setup
    order = attr_f.flat().argsort(descending=True).tolist()
    assert order[:3] == [neuron_node(SHARED), *sorted([neuron_node(1), neuron_node(2)])] or \
        order[0] == neuron_node(SHARED)
    assert attr_r.flat()[neuron_node(SHARED)] > 0 and attr_f.flat()[neuron_node(1)] > 0


def test_necessity_finds_the_fact_neurons_and_skips_the_shared_one(setup):
    model, tokenizer, attr_f, attr_r = setup
    circuit = select_necessary(model, tokenizer, FORGET, RETAIN, attr_f, attr_r,
                               forget_removed=0.3, retain_removed=0.2, share_of_parameters=1.0,
                               progress=False)
    assert set(circuit.flat().nonzero()[:, 0].tolist()) == {neuron_node(1), neuron_node(2)}
    report = circuit.report["necessity"]
    assert report["reached"] and report["forget_removed"] >= 0.3 >= 0.2 >= report["retain_removed"]
    shared_alone = [p for p in report["trajectory"] if p[0] == 1 and not p[3]]
    assert shared_alone and shared_alone[0][2] > 0.2  # the shared neuron broke the retain bound
    # Budget above the nodes' entries: every quantized entry the two neurons own is kept.
    owned = {n: m for n, m in parameter_mask(model, circuit).items()}
    assert set(owned) == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert sum(int(m.sum()) for m in owned.values()) == 3 * 2 * HIDDEN
    json.dumps(circuit.to_json(), allow_nan=False)


def test_weight_cut_keeps_only_what_the_forget_metric_moves(setup):
    model, tokenizer, attr_f, attr_r = setup
    index = {w: i for i, w in enumerate(WORDS)}
    circuit = select_necessary(model, tokenizer, FORGET, RETAIN, attr_f, attr_r,
                               forget_removed=0.3, retain_removed=0.2, share_of_parameters=0.002,
                               curve_points=0, progress=False)
    weights = circuit.report["weights"]
    assert weights["entries"] <= weights["budget"] < 3 * 2 * HIDDEN
    mask = parameter_mask(model, circuit)
    assert sum(int(m.sum()) for m in mask.values()) == weights["entries"]
    for q in FORGET:
        subject, neuron = index[q.question.split()[-1]], OWN[q.question.split()[-1]]
        answer = index[q.choices[q.answer]]
        assert mask["model.layers.1.mlp.gate_proj.weight"][neuron, subject]
        assert mask["model.layers.1.mlp.up_proj.weight"][neuron, subject]
        assert mask["model.layers.1.mlp.down_proj.weight"][answer, neuron]
    # Nothing outside the two fact neurons; no gate/up entry off the subjects' dimensions.
    gate = mask["model.layers.1.mlp.gate_proj.weight"]
    assert gate.nonzero()[:, 0].unique().tolist() == [1, 2]
    assert set(gate.nonzero()[:, 1].tolist()) == {index["veltrax"], index["zorim"]}
    # Zeroing the kept weights removes the forget metric and leaves retain.
    assert weights["zeroed_forget_removed"] >= 0.3 and abs(weights["zeroed_retain_removed"]) < 1e-3


def test_stability_halves_and_the_rule_switch(setup):
    model, tokenizer, attr_f, attr_r = setup
    common = dict(threshold=0.8, forget_removed=0.3, retain_removed=0.2, share_of_parameters=1.0,
                  batch_size=8, progress=False)
    circuit = select(model, tokenizer, FORGET, RETAIN, attr_f, attr_r, rule="necessity",
                     attribute_kwargs=SETTINGS, **common)
    stability = circuit.report["stability"]
    # Each half holds one fact, so each selects only its own neuron: disjoint sets.
    assert stability["half_nodes"] == [1, 1] and stability["node_jaccard"] == 0.0
    assert stability["weight_jaccard"] == 0.0
    sufficient = select(model, tokenizer, FORGET, RETAIN, attr_f, attr_r, rule="sufficiency",
                        **common)
    assert sufficient.rule == "sufficiency" and sufficient.weights is None
    with pytest.raises(ValueError, match="unknown rule"):
        select(model, tokenizer, FORGET, RETAIN, attr_f, attr_r, rule="both", **common)


def test_the_config_selects_the_rule():
    from conftest import compose_config
    from hydra.utils import instantiate

    from mansu.config import ConfigError, validate

    settings = instantiate(compose_config(["attribution.select=necessity",
                                           "attribution.share_of_parameters=0.01"]).attribution)
    kwargs = settings.selection_kwargs()
    assert kwargs["rule"] == "necessity" and kwargs["share_of_parameters"] == 0.01
    assert kwargs["skip_modules"] == ("lm_head",)
    with pytest.raises(ConfigError, match="attribution.select"):
        validate(compose_config(["attribution.select=both"]))


def test_patch_evaluator_reuses_the_counterfactual_without_changing_results(setup):
    from mansu.attribution.ablation import PatchEvaluator

    model, tokenizer, attr_f, _ = setup
    sets = [torch.tensor([neuron_node(1)]), torch.tensor([neuron_node(1), neuron_node(SHARED)])]
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))  # one model pass
    try:
        kept = PatchEvaluator(model, tokenizer, FORGET, attr_f, progress=False)
        fresh = PatchEvaluator(model, tokenizer, FORGET, attr_f, progress=False, max_source_bytes=0)
        first = kept.removed(sets[:1]), fresh.removed(sets[:1])
        calls.clear()
        second = kept.removed(sets[1:])
        kept_calls = len(calls)
        calls.clear()
        second_fresh = fresh.removed(sets[1:])
        fresh_calls = len(calls)
    finally:
        hook.remove()
    assert first[0] == first[1] and second == second_fresh  # bit-identical
    assert second[0] > first[0][0] > 0
    # Per batch: the variant's pass, against the variant's and the counterfactual's without the copy.
    assert kept_calls >= 1 and fresh_calls == 2 * kept_calls
