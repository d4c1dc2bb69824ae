"""EAP-IG attribution, circuit selection and parameter masks (mansu.attribution.nodes, metric, eap_ig,
selection, circuit) on tiny random models of every supported family, checked against hooks and
weights addressed by module name here (not through the module under test)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CONFIGS, HEADS, HIDDEN, NEURONS, VOCAB, build, make_tokenizer
from conftest import FORGET_MCQS as FORGET
from conftest import MCQ_CORPUS as CORPUS
from conftest import RETAIN_MCQS as RETAIN
from transformers import OPTConfig, OPTForCausalLM

from mansu.attribution.circuit import Circuit, mask_share, parameter_mask
from mansu.attribution.eap_ig import Attribution, attribute, mean_baseline, plot_attribution
from mansu.attribution.metric import NEUTRAL_STEM, build_rows, neutral_ids
from mansu.attribution.nodes import UnsupportedArchitectureError, node_layout
from mansu.attribution.selection.sufficiency import select_circuit, specificity
from mansu.data import MCQ
from mansu.evaluate.mcq import choice_logprobs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# CORPUS, FORGET, RETAIN, the family models (CONFIGS, build, their sizes), make_tokenizer and the
# tokenizer fixture are conftest's, shared with tests/cad.
# Written out here, independently of the module's table: (layer prefix, head output projection,
# neuron output projection, q/k/v modules, neuron input modules).
NAMES = {
    **{family: ("model.layers", "self_attn.o_proj", "mlp.down_proj",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("mlp.gate_proj", "mlp.up_proj"))
       for family in ("llama", "qwen2", "qwen3", "mistral", "gemma")},
    "gpt2": ("transformer.h", "attn.c_proj", "mlp.c_proj", ("attn.c_attn",), ("mlp.c_fc",)),
    "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h",
                 ("attention.query_key_value",), ("mlp.dense_h_to_4h",)),
}
KV_HEADS = {"llama": 2, "qwen2": 2, "qwen3": 2, "mistral": 2, "gemma": 1, "gpt2": 4, "gpt_neox": 4}
HEAD_DIM = {"gemma": 16}


def module(model, family, layer, which):
    prefix, head_out, neuron_out, _, _ = NAMES[family]
    relative = {"heads": head_out, "neurons": neuron_out}.get(which, which)
    return model.get_submodule(f"{prefix}.{layer}.{relative}")


def run(model, ids, edits=()):
    """Logits of ``model`` on ``ids``; ``edits`` are (family, layer, "heads" | "neurons", fn):
    pre-hooks that rewrite the input of that layer's output projection."""
    handles = [module(model, family, layer, which).register_forward_pre_hook(
        lambda _m, args, fn=fn: (fn(args[0]),)) for family, layer, which, fn in edits]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def capture(model, family, ids, layer):
    """(head inputs, neuron inputs) of ``layer``'s output projections on ``ids``."""
    store = {}
    handles = [module(model, family, layer, which).register_forward_pre_hook(
        lambda _m, args, which=which: store.__setitem__(which, args[0].clone()))
        for which in ("heads", "neurons")]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return store["heads"], store["neurons"]


IDS = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def one_node_circuit(model, *, head: int | None = None, neuron: int | None = None, layer: int = 1,
                     neuron_block: int = 1):
    layout = node_layout(model)
    heads = torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.bool)
    neurons = torch.zeros(layout.n_layers, layout.n_blocks(neuron_block), dtype=torch.bool)
    if head is not None:
        heads[layer, head] = True
    if neuron is not None:
        neurons[layer, neuron] = True
    return Circuit(heads, neurons, neuron_block)


# ---------------------------------------------------------------------------------------------
# Layout and masks


@pytest.mark.parametrize("family", list(CONFIGS))
def test_node_layout_reads_each_family(family):
    layout = node_layout(build(family))
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.n_neurons) == (
        2, HEADS, KV_HEADS[family], NEURONS)
    assert layout.head_dim == HEAD_DIM.get(family, HIDDEN // HEADS)
    assert layout.module_name(1, layout.structure.head_out) == (
        f"{NAMES[family][0]}.1.{NAMES[family][1]}")


def test_unsupported_architecture_is_named():
    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitectureError, match="OPTForCausalLM.*'opt'"):
        node_layout(model)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_output_projection_mask_equals_head_and_neuron_ablation(family):
    model = build(family)
    layout = node_layout(model)
    hd = layout.head_dim
    for head, neuron in ((0, 5), (HEADS - 1, NEURONS - 1)):
        mask = parameter_mask(model, one_node_circuit(model, head=head, neuron=neuron))
        head_cols, neuron_cols = torch.arange(head * hd, (head + 1) * hd), torch.tensor([neuron])
        ablated = run(model, IDS, [
            (family, 1, "heads", lambda z, cols=head_cols: z.index_fill(-1, cols, 0.0)),
            (family, 1, "neurons", lambda z, cols=neuron_cols: z.index_fill(-1, cols, 0.0))])
        zeroed = build(family)
        with torch.no_grad():
            for which in ("heads", "neurons"):
                weight = module(zeroed, family, 1, which).weight
                name = f"{NAMES[family][0]}.1.{NAMES[family][1 if which == 'heads' else 2]}"
                weight[mask[name + ".weight"]] = 0.0
                assert f"{name}.bias" not in mask  # shared by every node
        assert torch.equal(run(zeroed, IDS), ablated)
        assert not torch.equal(run(model, IDS), ablated)


def _perturbed(family, mask, names, *, inside: bool, only: tuple[str, int] | None = None):
    """A copy whose ``names`` parameters get noise on the masked entries (or on the others);
    ``only`` = (param name, index along the owned axis) restricts it to one row/column."""
    model = build(family)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names:
            chosen = mask.get(name, torch.zeros_like(params[name], dtype=torch.bool))
            chosen = chosen if inside else ~chosen
            if only is not None:
                if only[0] != name:
                    continue
                axis = 1 if (family == "gpt2" and name.endswith("weight")) else 0
                single = torch.zeros_like(chosen)
                single.select(axis, only[1]).fill_(True)
                chosen = single
            noise = torch.randn(params[name].shape, generator=generator)
            params[name] += noise * chosen
    return model


@pytest.mark.parametrize("family", list(CONFIGS))
def test_qkv_mask_is_exactly_what_the_head_reads(family):
    model = build(family)
    layout = node_layout(model)
    hd, group = layout.head_dim, HEADS // KV_HEADS[family]
    head = HEADS - 1
    mask = parameter_mask(model, one_node_circuit(model, head=head))
    prefix = NAMES[family][0]
    qkv = [f"{prefix}.1.{m}.{p}" for m in NAMES[family][3] for p in ("weight", "bias")
           if getattr(model.get_submodule(f"{prefix}.1.{m}"), p, None) is not None]
    heads_of = lambda z: z.view(*z.shape[:-1], HEADS, hd)  # noqa: E731
    clean = heads_of(capture(model, family, IDS, 1)[0])

    # Noise everywhere outside the mask leaves the head's output bit-identical ...
    outside = heads_of(capture(_perturbed(family, mask, qkv, inside=False), family, IDS, 1)[0])
    assert torch.equal(outside[..., head, :], clean[..., head, :])
    assert not torch.equal(outside, clean)
    # ... noise inside it moves only the heads that share its kv head ...
    inside = heads_of(capture(_perturbed(family, mask, qkv, inside=True), family, IDS, 1)[0])
    others = [h for h in range(HEADS) if h // group != head // group]
    assert torch.equal(inside[..., others, :], clean[..., others, :])
    # ... and every masked row (column for Conv1D) matters on its own.
    for name in (n for n in qkv if n.endswith("weight")):
        axis = 1 if family == "gpt2" else 0
        owned = mask[name].any(dim=1 - axis).nonzero()[:, 0]
        assert mask[name].sum() == owned.numel() * mask[name].shape[1 - axis]
        for index in owned.tolist():
            one = _perturbed(family, mask, [name], inside=True, only=(name, index))
            assert not torch.equal(heads_of(capture(one, family, IDS, 1)[0])[..., head, :],
                                   clean[..., head, :])
    q_rows = hd
    kv_rows = 2 * hd
    assert sum(int(mask[n].sum()) for n in qkv if n.endswith("weight")) == (
        (q_rows + kv_rows) * HIDDEN)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_neuron_input_mask_is_exactly_what_the_neuron_reads(family):
    model = build(family)
    neuron = 7
    mask = parameter_mask(model, one_node_circuit(model, neuron=neuron))
    prefix = NAMES[family][0]
    fc_in = [f"{prefix}.1.{m}.{p}" for m in NAMES[family][4] for p in ("weight", "bias")
             if getattr(model.get_submodule(f"{prefix}.1.{m}"), p, None) is not None]
    clean = capture(model, family, IDS, 1)[1]
    outside = capture(_perturbed(family, mask, fc_in, inside=False), family, IDS, 1)[1]
    inside = capture(_perturbed(family, mask, fc_in, inside=True), family, IDS, 1)[1]
    rest = [j for j in range(NEURONS) if j != neuron]
    assert torch.equal(outside[..., neuron], clean[..., neuron])
    assert torch.equal(inside[..., rest], clean[..., rest])
    assert not torch.equal(inside[..., neuron], clean[..., neuron])
    weights = [n for n in fc_in if n.endswith("weight")]
    assert sum(int(mask[n].sum()) for n in weights) == len(weights) * HIDDEN


def test_neuron_blocks_cover_the_last_partial_block():
    model = build("llama")
    layout = node_layout(model)
    assert layout.n_blocks(5) == 10  # 48 neurons: nine blocks of 5 and one of 3
    mask = parameter_mask(model, one_node_circuit(model, neuron=9, neuron_block=5))
    down = mask["model.layers.1.mlp.down_proj.weight"]
    assert down.any(0).nonzero()[:, 0].tolist() == [45, 46, 47]
    assert down.all(0)[45:].all()
    owned = 3 * HIDDEN * 3  # gate row, up row, down column of three neurons
    assert sum(int(m.sum()) for m in mask.values()) == owned
    total = sum(p.numel() for p in model.parameters())
    assert mask_share(mask, model) == pytest.approx(owned / total)


# ---------------------------------------------------------------------------------------------
# Prompts, counterfactuals and the metric


def test_stem_swap_replaces_exactly_the_question_tokens():
    tokenizer = make_tokenizer(add_bos=True)
    neutral = neutral_ids(tokenizer, "calm")  # shorter than any question: it repeats
    long_question = MCQ("The Veltrax virus that the city of Brano knew is carried by",
                        ("ticks", "bats", "rats", "fleas"), 0)
    for scoring in ("letter", "cloze"):
        for row in build_rows(tokenizer, [long_question], scoring, neutral):
            assert len(row.corrupt) == len(row.clean)
            changed = [p for p, (a, b) in enumerate(zip(row.clean, row.corrupt)) if a != b]
            question_ids = tokenizer(long_question.question, add_special_tokens=False)
            stem_length = len(question_ids["input_ids"])
            assert row.clean[0] == row.corrupt[0] == tokenizer.bos_token_id
            assert row.corrupt[1 : 1 + stem_length] == [
                neutral[k % len(neutral)] for k in range(stem_length)]
            assert row.clean[1 + stem_length :] == row.corrupt[1 + stem_length :]
            assert changed and max(changed) <= stem_length


def test_letter_scoring_needs_single_token_letters():
    tokenizer = make_tokenizer(letter_tokens=False)
    with pytest.raises(ValueError, match="single tokens"):
        attribute(build("llama"), tokenizer, FORGET, scoring="letter", progress=False)


def test_metric_matches_the_evaluation_scores(tokenizer):
    model = build("llama", 0.2)
    result = attribute(model, tokenizer, FORGET, scoring="cloze", ig_steps=1,
                            progress=False)
    logprobs = choice_logprobs(model, tokenizer, FORGET, scoring="cloze")
    for i, q in enumerate(FORGET):
        others = [c for c in range(4) if c != q.answer]
        expected = logprobs[i, q.answer] - logprobs[i, others].mean()
        assert result.metric_clean[i] == pytest.approx(float(expected), abs=1e-4)

    letters = attribute(model, tokenizer, FORGET, scoring="letter", ig_steps=1,
                             progress=False)
    letter_ids = [tokenizer(" " + letter)["input_ids"][0] for letter in "ABCD"]
    for i, q in enumerate(FORGET):
        prompt = q.question + "".join(f"\n{ll}. {c}" for ll, c in zip("ABCD", q.choices))
        ids = torch.tensor([tokenizer(prompt + "\nAnswer:")["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1, letter_ids]
        expected = logits[q.answer] - torch.cat([logits[:q.answer], logits[q.answer + 1:]]).mean()
        assert letters.metric_clean[i] == pytest.approx(float(expected), abs=1e-4)

    texts = CORPUS[:3]
    corpus = attribute(model, tokenizer, texts, scoring="corpus", ig_steps=1, progress=False)
    for i, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss
        assert corpus.metric_clean[i] == pytest.approx(-float(loss), abs=1e-4)


def test_mean_counterfactual_uses_the_retain_means(tokenizer):
    model = build("llama", 0.2)
    with pytest.raises(ValueError, match="mean_items"):
        attribute(model, tokenizer, FORGET, counterfactual="mean", progress=False)
    baseline = mean_baseline(model, tokenizer, RETAIN, scoring="letter", batch_size=1)
    ids = [tokenizer(q.question + "".join(f"\n{ll}. {c}" for ll, c in zip("ABCD", q.choices))
                     + "\nAnswer:")["input_ids"] for q in RETAIN]
    embeds = torch.cat([model.get_input_embeddings()(torch.tensor(i)) for i in ids])
    torch.testing.assert_close(baseline.embed, embeds.mean(0))
    down_inputs = torch.cat([capture(model, "llama", torch.tensor([i]), 0)[1][0] for i in ids])
    torch.testing.assert_close(baseline.acts["neurons", 0], down_inputs.mean(0))
    result = attribute(model, tokenizer, FORGET, scoring="letter", counterfactual="mean",
                            mean_items=RETAIN, progress=False)
    assert result.flat().abs().sum() > 0 and result.baseline is not None


# ---------------------------------------------------------------------------------------------
# EAP-IG against patching one node at a time


def row_metric(logits, row, scoring) -> torch.Tensor:
    """One token row's contribution to its item's M, from that row's logits [T, V]."""
    read = logits[row.positions].float()
    read = read if scoring == "letter" else read.log_softmax(-1)
    return (read[range(len(row.tokens)), row.tokens] * torch.tensor(row.weights)).sum()


def swap_rows(tokenizer, scoring):
    return build_rows(tokenizer, FORGET, scoring,
                            neutral_ids(tokenizer, NEUTRAL_STEM))


def units(layout):
    """(flat node index, layer, "heads" | "neurons", activation columns) of every node."""
    nodes = []
    for layer in range(layout.n_layers):
        for h in range(layout.n_heads):
            cols = torch.arange(h * layout.head_dim, (h + 1) * layout.head_dim)
            nodes.append((layer * layout.n_heads + h, layer, "heads", cols))
    for layer in range(layout.n_layers):
        for j in range(layout.n_neurons):
            index = layout.n_layers * layout.n_heads + layer * layout.n_neurons + j
            nodes.append((index, layer, "neurons", torch.tensor([j])))
    return nodes


def patched_metrics(model, family, row, scoring, variants: list[list]) -> list[float]:
    """M of one row on its clean input, once per variant (a list of units set to their values
    on x~), all variants in one batch."""
    layers = range(node_layout(model).n_layers)
    sources = {layer: dict(zip(("heads", "neurons"),
                               capture(model, family, torch.tensor([row.corrupt]), layer)))
               for layer in layers}

    def edit(layer, which):
        def fn(z):
            z = z.clone()
            for k, variant in enumerate(variants):
                for _, ll, w, cols in variant:
                    if (ll, w) == (layer, which):
                        z[k, :, cols] = sources[layer][which][0, :, cols]
            return z
        return fn

    edits = [(family, layer, which, edit(layer, which))
             for layer in layers for which in ("heads", "neurons")]
    logits = run(model, torch.tensor([row.clean] * len(variants)), edits)
    return [float(row_metric(logits[k], row, scoring)) for k in range(len(variants))]


def single_node_effects(model, family, tokenizer, scoring):
    """M(x) - M(x with one node patched to its value on x~), mean over items, per node."""
    nodes = units(node_layout(model))
    effects = torch.zeros(len(nodes))
    for row in swap_rows(tokenizer, scoring):
        base, *patched = patched_metrics(model, family, row, scoring, [[]] + [[n] for n in nodes])
        for node, value in zip(nodes, patched):
            effects[node[0]] += base - value
    return effects / len(FORGET)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_one_step_eap_is_gradient_times_difference(tokenizer, family):
    """With m = 1 the score is (z(x) - z(x~)) . dM/dz at x: computed here by plain autograd."""
    model = build(family, 0.05)
    got = attribute(model, tokenizer, FORGET, scoring="cloze", ig_steps=1, progress=False)
    nodes = units(node_layout(model))
    expected = torch.zeros(len(nodes))
    for row in swap_rows(tokenizer, "cloze"):
        corrupt = {layer: capture(model, family, torch.tensor([row.corrupt]), layer)
                   for layer in range(2)}
        store, handles = {}, []
        for layer in range(2):
            for which in ("heads", "neurons"):
                def keep(_m, args, key=(layer, which), store=store):
                    args[0].retain_grad()
                    store[key] = args[0]
                handles.append(module(model, family, layer, which).register_forward_pre_hook(keep))
        row_metric(model(torch.tensor([row.clean])).logits[0], row, "cloze").backward()
        for h in handles:
            h.remove()
        for index, layer, which, cols in nodes:
            z = store[layer, which]
            diff = z.detach() - corrupt[layer][0 if which == "heads" else 1]
            expected[index] += (diff * z.grad)[..., cols].sum()
    model.zero_grad()
    torch.testing.assert_close(got.flat(), expected / len(FORGET), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family,scoring", [("llama", "cloze"), ("llama", "letter"),
                                            ("gpt2", "cloze"), ("gpt_neox", "cloze")])
def test_eap_ig_tracks_single_node_patching(tokenizer, family, scoring):
    # initializer_range 0.05: single nodes move M by ~1e-2, far above float noise, while the
    # model is still smooth enough along the path for a first-order score to mean something.
    model = build(family, 0.05)
    scores = attribute(model, tokenizer, FORGET, scoring=scoring, ig_steps=5,
                            progress=False).flat()
    effects = single_node_effects(model, family, tokenizer, scoring)
    assert effects.abs().mean() > 1e-3
    assert torch.corrcoef(torch.stack([scores, effects]))[0, 1] >= 0.9


# ---------------------------------------------------------------------------------------------
# Circuit selection


def planted(scores_heads, scores_neurons, like: Attribution) -> Attribution:
    return Attribution(scores_heads, scores_neurons, like.metric_clean, like.metric_corrupt,
                            like.scoring, like.counterfactual, like.neuron_block, like.ig_steps,
                            like.neutral_stem)


def test_select_circuit_ranks_by_specificity_and_stops_at_threshold(tokenizer):
    model = build("llama", 0.2)
    measured = attribute(model, tokenizer, FORGET, neuron_block=8, progress=False)
    # Forget scores 1..n; retain scores that cancel the forget specificity of the top 3 nodes.
    n = measured.flat().numel()
    forget_flat = torch.arange(1.0, n + 1)
    retain_flat = torch.zeros(n)
    retain_flat[-3:] = forget_flat[-3:] / forget_flat.sum() * 10
    layers = 2
    attr_f = planted(forget_flat[: layers * HEADS].view(layers, HEADS),
                     forget_flat[layers * HEADS :].view(layers, -1), measured)
    attr_r = planted(retain_flat[: layers * HEADS].view(layers, HEADS),
                     retain_flat[layers * HEADS :].view(layers, -1), measured)
    order = specificity(attr_f, attr_r).argsort(descending=True).tolist()
    assert order[:3] == [n - 4, n - 5, n - 6] and set(order[-3:]) == {n - 1, n - 2, n - 3}

    circuit = select_circuit(model, tokenizer, FORGET, attr_f, attr_r, threshold=0.8,
                                  progress=False)
    curve = dict(circuit.curve)
    assert curve[n] == pytest.approx(1.0, abs=1e-6)
    assert curve[circuit.size] >= 0.8 == circuit.threshold
    assert circuit.size == 1 or curve[circuit.size - 1] < 0.8
    assert sorted(circuit.flat().nonzero()[:, 0].tolist()) == sorted(order[: circuit.size])

    # The chosen size's faithfulness, recomputed one row at a time with hooks written here.
    blocks = units(node_layout(model))
    in_circuit = set(circuit.flat().nonzero()[:, 0].tolist())
    outside = [u for u in blocks if _node_of(u, neuron_block=8) not in in_circuit]
    clean = everything = kept = 0.0
    for row in swap_rows(tokenizer, "cloze"):
        values = patched_metrics(model, "llama", row, "cloze", [[], blocks, outside])
        clean, everything, kept = clean + values[0], everything + values[1], kept + values[2]
    assert circuit.faithfulness == pytest.approx((kept - everything) / (clean - everything),
                                                 abs=1e-4)
    assert circuit.to_json()["size"] == circuit.size


def _node_of(unit, *, neuron_block):
    """The flat circuit node a unit belongs to (neurons grouped into blocks)."""
    index, layer, which, cols = unit
    if which == "heads":
        return index
    n_blocks = -(-NEURONS // neuron_block)
    return 2 * HEADS + layer * n_blocks + int(cols[0]) // neuron_block


def test_plot_writes_a_png(tokenizer, tmp_path):
    model = build("llama")
    before = attribute(model, tokenizer, FORGET, neuron_block=4, progress=False)
    path = plot_attribution(before, before, tmp_path / "attribution.png", max_columns=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
