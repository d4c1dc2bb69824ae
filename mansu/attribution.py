"""Node-level EAP-IG attribution, circuit selection by forget-specificity and faithfulness, and the
circuit's parameter mask (METHOD.md §3).

Nodes are the attention heads and the MLP neurons of every layer (neurons optionally grouped into
fixed-size blocks, ``neuron_block``). A node's output z_v is read by a forward pre-hook on the
input of the layer's output projection: the head outputs are the input of o_proj / attn.c_proj /
attention.dense (reshaped to heads), the neurons the input of down_proj / mlp.c_proj /
dense_4h_to_h. The table ``_STRUCTURES`` names these modules per family; a model none of its rows
fits is refused with a message that names it. Plain torch hooks on Hugging Face models, so the same
code runs on a bitsandbytes-quantized copy (the hooks read Linear inputs, which stay real tensors,
and gradients reach them through the 4-bit matmul even though the packed weights have none).

The metric M of one item (higher = the model knows it better):
- ``letter``: logit(correct letter) - mean logit(other letters) at the answer position, the prompt
  being ``mansu.evaluation``'s ("{question}\\nA. ..\\nAnswer:", letters " A".." D").
- ``cloze``: log p(correct continuation) - mean log p(other continuations), each continuation's
  log-likelihood summed over its tokens exactly as ``mansu.evaluation`` scores it (context =
  question, continuation = " " + choice, lm-eval tokenisation). It is the letter metric's analogue
  with the option's own likelihood in place of the letter's logit, and the quantity whose sign
  decides the cloze prediction. It costs one sequence per choice; a first-token-only shortcut
  would be one sequence per question but is blind to options that share their first token, so
  the exact form is used.
- ``corpus`` (items are strings): -mean NLL of the text's tokens.

The counterfactual x~ is either ``stem_swap``: the same token sequence with the question stem's
tokens (every non-special token of the context that starts inside the question; for corpus text,
the first half of its tokens) replaced by a neutral stem repeated or cut to exactly that many
tokens, so positions align by construction and no prompt needs a fallback; or ``mean``: every node
replaced by its mean activation over the retain questions (all their tokens), the integrated-
gradients path then starting from the mean input embedding. M's targets stay the clean item's.

Score of node v, averaged over items: a_v = sum_pos (z_v(x) - z_v(x~)) . (1/m) sum_k dM/dz_v at
input embeddings e(x~) + (k/m)(e(x) - e(x~)), k = 1..m. Per batch: one clean and one counterfactual
forward without gradients, then m forward-backward passes that differentiate M with respect to the
node activations only (no parameter gradients). Nothing is kept across batches except the running
scores.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mansu.data import MCQ
from mansu.evaluation import encode_pairs, mcq_requests

SCORINGS = ("cloze", "letter", "corpus")
COUNTERFACTUALS = ("stem_swap", "mean")
NEUTRAL_STEM = ("Here is a plain sentence about nothing in particular, written only to fill the "
                "space that a question would take, and it goes on in the same way for a while.")
HEADS, NEURONS = "heads", "neurons"


class UnsupportedArchitectureError(ValueError):
    """A model whose module structure matches no family in the attribution table."""


# ---------------------------------------------------------------------------------------------
# Where the nodes live, per family


@dataclass(frozen=True)
class _Structure:
    """Module names inside one decoder layer. ``qkv_layout``: ``separate`` (q_proj/k_proj/v_proj),
    ``blocks`` (fused [q | k | v] along the output, GPT-2) or ``per_head`` (fused, each head's
    [q k v] contiguous, GPT-NeoX). ``conv1d``: weights stored (in, out), GPT-2's Conv1D."""

    name: str
    layers: str
    qkv: tuple[str, ...]
    qkv_layout: str
    head_out: str
    neuron_in: tuple[str, ...]
    neuron_out: str
    conv1d: bool


_STRUCTURES = (
    _Structure("llama-style", "model.layers",
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "separate",
               "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", False),
    _Structure("gpt2", "transformer.h", ("attn.c_attn",), "blocks", "attn.c_proj",
               ("mlp.c_fc",), "mlp.c_proj", True),
    _Structure("gpt-neox", "gpt_neox.layers", ("attention.query_key_value",), "per_head",
               "attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", False),
)
SUPPORTED = "Llama, Qwen2, Qwen3, Mistral, Gemma (llama-style names), GPT-2, GPT-NeoX"


@dataclass(frozen=True)
class NodeLayout:
    family: str  # the config's model_type
    structure: _Structure
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_neurons: int
    hidden_size: int

    def module_name(self, layer: int, relative: str) -> str:
        return f"{self.structure.layers}.{layer}.{relative}"

    def n_blocks(self, neuron_block: int) -> int:
        return math.ceil(self.n_neurons / neuron_block)


def node_layout(model: nn.Module) -> NodeLayout:
    """The model's heads and neurons, found from its own module structure."""
    config = model.config
    for structure in _STRUCTURES:
        layers = _find(model, structure.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        names = (*structure.qkv, structure.head_out, *structure.neuron_in, structure.neuron_out)
        if all(_find(layers[0], name) is not None for name in names):
            break
    else:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', '?')!r}) is not "
            f"supported by attribution: its layers have none of the module layouts it knows "
            f"({SUPPORTED}; e.g. self_attn.o_proj + mlp.down_proj)")
    n_heads = config.num_attention_heads
    head_out = _find(layers[0], structure.head_out)
    attn_width = _in_features(head_out)
    if attn_width % n_heads:
        raise UnsupportedArchitectureError(
            f"{structure.head_out} takes {attn_width} inputs, not a multiple of {n_heads} heads")
    return NodeLayout(
        family=getattr(config, "model_type", structure.name),
        structure=structure,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=attn_width // n_heads,
        n_neurons=_in_features(_find(layers[0], structure.neuron_out)),
        hidden_size=config.hidden_size,
    )


def _find(root: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        return None


def _in_features(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return module.in_features
    return module.weight.shape[0]  # transformers' Conv1D stores (in, out)


# ---------------------------------------------------------------------------------------------
# Items -> token rows with the metric's read-out positions


@dataclass
class _Row:
    clean: list[int]
    corrupt: list[int] | None
    item: int
    positions: list[int]  # where the logits are read
    tokens: list[int]  # which vocabulary entry is read there
    weights: list[float]  # its weight in M


def _build_rows(tokenizer, items: Sequence, scoring: str, neutral: list[int] | None) -> list[_Row]:
    if scoring == "corpus":
        return [_corpus_row(tokenizer, text, i, neutral) for i, text in enumerate(items)]
    rows = []
    for i, question in enumerate(items):
        if not isinstance(question, MCQ):
            raise TypeError(f"{scoring} scoring needs MCQ items, got {type(question).__name__}")
        context, continuations = mcq_requests(question, scoring)
        encoded = encode_pairs(tokenizer, [(context, cont) for cont in continuations])
        context_ids = encoded[0][0]
        stem = _stem_positions(tokenizer, context, context_ids, len(question.question))
        n = len(continuations)
        weights = [1.0 if c == question.answer else -1.0 / (n - 1) for c in range(n)]
        if scoring == "letter":
            if any(len(cont) != 1 for _, cont in encoded):
                raise ValueError("letter scoring reads the letters' logits, so ' A'..' D' must be "
                                 f"single tokens; this tokenizer splits {continuations}")
            clean = list(context_ids)
            rows.append(_Row(clean, _swap(clean, stem, neutral), i, [len(clean) - 1] * n,
                             [cont[0] for _, cont in encoded], weights))
            continue
        for (ctx, cont), weight in zip(encoded, weights):
            clean = (ctx + cont)[:-1]
            positions = list(range(len(ctx) - 1, len(ctx) - 1 + len(cont)))
            rows.append(_Row(clean, _swap(clean, stem, neutral), i, positions, list(cont),
                             [weight] * len(cont)))
    return rows


def _corpus_row(tokenizer, text: str, item: int, neutral: list[int] | None) -> _Row:
    if not isinstance(text, str):
        raise TypeError(f"corpus scoring needs text items, got {type(text).__name__}")
    encoding = tokenizer(text, return_special_tokens_mask=True)
    ids = encoding["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"corpus text {text!r} has fewer than two tokens: nothing to predict")
    content = [p for p, special in enumerate(encoding["special_tokens_mask"]) if not special]
    stem = content[: math.ceil(len(content) / 2)]
    n = len(ids) - 1
    return _Row(ids[:-1], _swap(ids[:-1], stem, neutral), item, list(range(n)), ids[1:],
                [1.0 / n] * n)


def _stem_positions(tokenizer, context: str, context_ids: list[int], stem_chars: int) -> list[int]:
    """Positions of the non-special tokens of ``context_ids`` that start inside its first
    ``stem_chars`` characters (the question), using the tokenizer's character offsets."""
    for add_special in (True, False):
        encoding = tokenizer(context, add_special_tokens=add_special, return_offsets_mapping=True,
                             return_special_tokens_mask=True)
        if encoding["input_ids"] == list(context_ids):
            break
    else:
        raise ValueError("cannot locate the question's tokens: the tokenizer encodes the prompt "
                         "differently with offsets than lm-eval's tokenisation does")
    return [p for p, ((start, _), special) in enumerate(
        zip(encoding["offset_mapping"], encoding["special_tokens_mask"]))
        if not special and start < stem_chars]


def _swap(clean: list[int], stem: list[int], neutral: list[int] | None) -> list[int] | None:
    if neutral is None:
        return None
    if not stem:
        raise ValueError("stem_swap found no question tokens to replace in this prompt; use "
                         "counterfactual='mean' for it")
    corrupt = list(clean)
    for k, position in enumerate(stem):
        corrupt[position] = neutral[k % len(neutral)]
    return corrupt


@dataclass
class _Batch:
    clean: Tensor  # [B, T]
    corrupt: Tensor | None
    mask: Tensor  # [B, T] attention mask
    keep: Tensor  # [B, T] bool: positions whose logits M reads
    items: Tensor  # [B] item of each row
    entry_row: Tensor  # [E] one entry per (row, position, token) read by M
    entry_logit: Tensor  # [E] its row in the kept logits
    entry_tok: Tensor
    entry_weight: Tensor


def _batches(rows: list[_Row], batch_size: int, pad_id: int, device) -> Iterator[_Batch]:
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r.clean) for r in chunk)
        clean = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        corrupt = clean.clone() if chunk[0].corrupt is not None else None
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        keep = torch.zeros((len(chunk), width), dtype=torch.bool)
        entry_row, entry_pos, entry_tok, entry_weight = [], [], [], []
        for b, row in enumerate(chunk):
            clean[b, : len(row.clean)] = torch.tensor(row.clean)
            if corrupt is not None:
                corrupt[b, : len(row.corrupt)] = torch.tensor(row.corrupt)
            mask[b, : len(row.clean)] = 1
            keep[b, row.positions] = True
            entry_row += [b] * len(row.positions)
            entry_pos += row.positions
            entry_tok += row.tokens
            entry_weight += row.weights
        # The kept logits come flattened row-major: position (b, t) is entry cumsum(keep) - 1.
        kept_index = keep.flatten().cumsum(0).view_as(keep) - 1
        entry_logit = kept_index[torch.tensor(entry_row), torch.tensor(entry_pos)]
        yield _Batch(
            clean=clean.to(device), corrupt=None if corrupt is None else corrupt.to(device),
            mask=mask.to(device), keep=keep.to(device), items=torch.tensor([r.item for r in chunk]),
            entry_row=torch.tensor(entry_row, device=device), entry_logit=entry_logit.to(device),
            entry_tok=torch.tensor(entry_tok, device=device),
            entry_weight=torch.tensor(entry_weight, dtype=torch.float32, device=device))


def _row_metric(logits: Tensor, batch: _Batch, scoring: str) -> Tensor:
    """[B] float32: each row's contribution to its item's M, from the kept logits [K, V]."""
    read = logits[batch.entry_logit].float()
    if scoring != "letter":
        read = read.log_softmax(-1)
    values = read.gather(1, batch.entry_tok[:, None])[:, 0] * batch.entry_weight
    rows = batch.clean.shape[0]
    return torch.zeros(rows, device=logits.device).index_add(0, batch.entry_row, values)


# ---------------------------------------------------------------------------------------------
# Hooks on the node outputs

# A hook body: (kind, layer, z) -> replacement z, or None to leave it.
_NodeFn = Callable[[str, int, Tensor], Tensor | None]


@contextmanager
def _node_hooks(model: nn.Module, layout: NodeLayout, fn: _NodeFn):
    handles = []
    for layer in range(layout.n_layers):
        for kind, relative in ((HEADS, layout.structure.head_out),
                               (NEURONS, layout.structure.neuron_out)):
            module = model.get_submodule(layout.module_name(layer, relative))

            def hook(_module, args, kind=kind, layer=layer):
                replaced = fn(kind, layer, args[0])
                return None if replaced is None else (replaced, *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _capture(store: dict) -> _NodeFn:
    def fn(kind, layer, z):
        store[kind, layer] = z

    return fn


def _logits(model: nn.Module, embeds: Tensor, batch: _Batch) -> Tensor:
    """Logits [K, V] at the positions M reads only (the vocabulary projection is the largest
    activation of a forward pass)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(inputs_embeds=embeds, attention_mask=batch.mask, logits_to_keep=batch.keep,
                     use_cache=False).logits
    return model(inputs_embeds=embeds, attention_mask=batch.mask, use_cache=False).logits[batch.keep]


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Attribution


@dataclass
class MeanBaseline:
    """The ``mean`` counterfactual: each node's mean activation and the mean input embedding."""

    embed: Tensor  # [d_model]
    acts: dict[tuple[str, int], Tensor]  # (kind, layer) -> [width]


@dataclass
class Attribution:
    """EAP-IG scores averaged over items: ``heads`` [L, H], ``neurons`` [L, ceil(N / block)].

    ``metric_clean`` [n_items] is M on each item; ``metric_corrupt`` is M on its counterfactual
    (``stem_swap``: the swapped input; ``mean``: every node replaced by its mean)."""

    heads: Tensor
    neurons: Tensor
    metric_clean: Tensor
    metric_corrupt: Tensor
    scoring: str
    counterfactual: str
    neuron_block: int
    ig_steps: int
    neutral_stem: str
    baseline: MeanBaseline | None = field(default=None, repr=False)

    def flat(self) -> Tensor:
        """All node scores, heads (layer-major) then neuron blocks (layer-major)."""
        return torch.cat([self.heads.flatten(), self.neurons.flatten()])


def attribute(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCQ] | Sequence[str],
    *,
    scoring: str = "cloze",
    counterfactual: str = "stem_swap",
    ig_steps: int = 5,
    batch_size: int = 8,
    neuron_block: int = 1,
    mean_items: Sequence[MCQ] | Sequence[str] | None = None,
    neutral_stem: str = NEUTRAL_STEM,
    progress: bool = True,
) -> Attribution:
    """EAP-IG node scores of ``model`` on ``items`` (batch_size counts token sequences: one per
    question for letter scoring, one per choice for cloze). ``mean_items`` (the retain questions)
    are required by and only used for ``counterfactual="mean"``."""
    _check_settings(scoring, counterfactual, ig_steps, neuron_block)
    if not items:
        raise ValueError("no items to attribute")
    layout = node_layout(model)
    baseline = None
    if counterfactual == "mean":
        if not mean_items:
            raise ValueError("counterfactual='mean' needs mean_items (the retain questions)")
        baseline = mean_baseline(model, tokenizer, mean_items, scoring=scoring,
                                 batch_size=batch_size)
    neutral = _neutral_ids(tokenizer, neutral_stem) if counterfactual == "stem_swap" else None
    rows = _build_rows(tokenizer, items, scoring, neutral)

    heads = torch.zeros(layout.n_layers, layout.n_heads)
    neurons = torch.zeros(layout.n_layers, layout.n_neurons)
    metric_clean = torch.zeros(len(items))
    metric_corrupt = torch.zeros(len(items))
    device = model.get_input_embeddings().weight.device
    batches = _batches(rows, batch_size, _pad_id(tokenizer), device)
    total = math.ceil(len(rows) / batch_size)
    with _eval_mode(model):
        for batch in tqdm(batches, total=total, desc="attribution", disable=not progress):
            clean_embeds, corrupt_embeds, diffs, m_clean, m_corrupt = _endpoints(
                model, layout, batch, scoring, baseline)
            metric_clean.index_add_(0, batch.items, m_clean.cpu())
            metric_corrupt.index_add_(0, batch.items, m_corrupt.cpu())
            for k in range(1, ig_steps + 1):
                step_heads, step_neurons = _ig_step(
                    model, layout, batch, scoring, diffs,
                    corrupt_embeds + (k / ig_steps) * (clean_embeds - corrupt_embeds))
                heads += step_heads
                neurons += step_neurons
    n = len(items)
    return Attribution(
        heads=heads / (ig_steps * n),
        neurons=_block_sum(neurons, neuron_block) / (ig_steps * n),
        metric_clean=metric_clean,
        metric_corrupt=metric_corrupt,
        scoring=scoring,
        counterfactual=counterfactual,
        neuron_block=neuron_block,
        ig_steps=ig_steps,
        neutral_stem=neutral_stem,
        baseline=baseline,
    )


@torch.no_grad()
def _endpoints(model, layout: NodeLayout, batch: _Batch, scoring: str,
               baseline: MeanBaseline | None) -> tuple[Tensor, Tensor, dict, Tensor, Tensor]:
    """The clean and counterfactual forwards of one batch: both input embeddings, the node
    activation differences z(x) - z(x~) (float32, zero at padding) and M on both sides."""
    embed = model.get_input_embeddings()
    clean_embeds = embed(batch.clean)
    diffs: dict = {}
    with _node_hooks(model, layout, _capture(diffs)):
        m_clean = _row_metric(_logits(model, clean_embeds, batch), batch, scoring)

    def subtract(kind, layer, counterfactual):
        # In place of the clean activation, so that one copy per node is alive at a time.
        real = batch.mask[..., None].to(counterfactual.device)
        diffs[kind, layer] = (diffs[kind, layer].float() - counterfactual.float()) * real

    if baseline is None:
        corrupt_embeds = embed(batch.corrupt)
        with _node_hooks(model, layout, subtract):
            m_corrupt = _row_metric(_logits(model, corrupt_embeds, batch), batch, scoring)
    else:
        corrupt_embeds = baseline.embed.expand_as(clean_embeds)
        with _node_hooks(model, layout, _patch_all(baseline.acts)):
            m_corrupt = _row_metric(_logits(model, clean_embeds, batch), batch, scoring)
        for kind, layer in list(diffs):
            subtract(kind, layer, baseline.acts[kind, layer].expand_as(diffs[kind, layer]))
    return clean_embeds, corrupt_embeds, diffs, m_clean, m_corrupt


def _ig_step(model, layout: NodeLayout, batch: _Batch, scoring: str, diffs: dict,
             embeds: Tensor) -> tuple[Tensor, Tensor]:
    """One integrated-gradients point: sum over rows and positions of diff . dM/dz, per node."""
    acts: dict = {}
    with torch.enable_grad():
        embeds = embeds.detach().requires_grad_(True)
        with _node_hooks(model, layout, _capture(acts)):
            metric = _row_metric(_logits(model, embeds, batch), batch, scoring).sum()
        keys = list(acts)
        # Only the activations are differentiated: autograd skips every parameter gradient.
        grads = torch.autograd.grad(metric, [acts[key] for key in keys], allow_unused=True)
    heads = torch.zeros(layout.n_layers, layout.n_heads)
    neurons = torch.zeros(layout.n_layers, layout.n_neurons)
    for (kind, layer), grad in zip(keys, grads):
        if grad is None:
            continue
        per_unit = (grad.float() * diffs[kind, layer]).sum((0, 1)).cpu()
        if kind == HEADS:
            heads[layer] = per_unit.view(layout.n_heads, layout.head_dim).sum(-1)
        else:
            neurons[layer] = per_unit
    return heads, neurons


def mean_baseline(model: nn.Module, tokenizer, items: Sequence, *, scoring: str,
                  batch_size: int = 8) -> MeanBaseline:
    """Mean node activations and mean input embedding over every token of ``items``' prompts."""
    layout = node_layout(model)
    embed = model.get_input_embeddings()
    rows = _build_rows(tokenizer, items, scoring, None)
    sums: dict = {}
    embed_sum = 0.0
    count = 0
    with _eval_mode(model), torch.no_grad():
        for batch in _batches(rows, batch_size, _pad_id(tokenizer), embed.weight.device):
            weights = batch.mask[..., None].float()
            embeds = embed(batch.clean)
            acts: dict = {}
            with _node_hooks(model, layout, _capture(acts)):
                _logits(model, embeds, batch)
            for key, z in acts.items():
                sums[key] = sums.get(key, 0.0) + (z.float() * weights).sum((0, 1))
            embed_sum = embed_sum + (embeds.float() * weights).sum((0, 1))
            count += int(batch.mask.sum())
    dtype = embed.weight.dtype
    return MeanBaseline(embed=(embed_sum / count).to(dtype),
                        acts={key: (total / count).to(dtype) for key, total in sums.items()})


def _patch_all(values: dict) -> _NodeFn:
    def fn(kind, layer, z):
        return values[kind, layer].expand_as(z)

    return fn


def _block_sum(scores: Tensor, block: int) -> Tensor:
    n_layers, n = scores.shape
    padded = torch.zeros(n_layers, math.ceil(n / block) * block)
    padded[:, :n] = scores
    return padded.view(n_layers, -1, block).sum(-1)


def _check_settings(scoring: str, counterfactual: str, ig_steps: int, neuron_block: int) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    if counterfactual not in COUNTERFACTUALS:
        raise ValueError(f"unknown counterfactual {counterfactual!r}; expected {COUNTERFACTUALS}")
    if ig_steps < 1 or neuron_block < 1:
        raise ValueError("ig_steps and neuron_block must be at least 1")


def _neutral_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the neutral stem encodes to no tokens")
    return ids


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


# ---------------------------------------------------------------------------------------------
# Circuit selection


@dataclass
class Circuit:
    """Selected nodes: ``heads`` [L, H] and ``neurons`` [L, n_blocks] boolean. ``curve`` lists
    every (size, faithfulness) evaluated; ``faithfulness`` is the chosen size's."""

    heads: Tensor
    neurons: Tensor
    neuron_block: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    faithfulness: float = float("nan")
    threshold: float = float("nan")

    @property
    def size(self) -> int:
        return int(self.heads.sum() + self.neurons.sum())

    def flat(self) -> Tensor:
        return torch.cat([self.heads.flatten(), self.neurons.flatten()])

    def nodes(self) -> list[tuple[str, int, int]]:
        """("head", layer, head) and ("neurons", layer, block) of every selected node."""
        return ([("head", int(layer), int(h)) for layer, h in self.heads.nonzero()]
                + [("neurons", int(layer), int(b)) for layer, b in self.neurons.nonzero()])

    def to_json(self) -> dict:
        return {"size": self.size, "n_heads": int(self.heads.sum()),
                "n_neuron_blocks": int(self.neurons.sum()), "neuron_block": self.neuron_block,
                "faithfulness": self.faithfulness, "threshold": self.threshold,
                "curve": [[s, f] for s, f in self.curve]}


def specificity(attr_f: Attribution, attr_r: Attribution, lam: float = 1.0) -> Tensor:
    """|a_f| / ||a_f||_1 - lam |a_r| / ||a_r||_1 per node (flat order)."""
    forget, retain = attr_f.flat().abs(), attr_r.flat().abs()
    if forget.shape != retain.shape:
        raise ValueError("forget and retain attributions have different node sets "
                         "(same model and neuron_block needed)")
    if forget.sum() == 0:
        raise ValueError("every forget attribution score is zero: nothing to rank")
    return forget / forget.sum() - lam * retain / retain.sum().clamp_min(1e-30)


def select_circuit(
    model: nn.Module,
    tokenizer,
    forget: Sequence,
    attr_f: Attribution,
    attr_r: Attribution,
    *,
    threshold: float = 0.8,
    lam: float = 1.0,
    curve_points: int = 16,
    batch_size: int = 8,
    progress: bool = True,
) -> Circuit:
    """Add nodes in order of forget-specificity until faithfulness on ``forget`` reaches
    ``threshold``. Faithfulness = (M(circuit clean, rest patched to x~) - M(all patched)) /
    (M(model) - M(all patched)), summed over items, with ``attr_f``'s scoring and counterfactual.
    Sizes are tried on a geometric grid, then bisected between the last grid size below the
    threshold and the first at or above it (faithfulness is treated as monotone there)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"faithfulness threshold must be in (0, 1], got {threshold}")
    layout = node_layout(model)
    order = specificity(attr_f, attr_r, lam).argsort(descending=True)
    n_nodes = order.numel()
    grid = sorted({max(1, round(s)) for s in torch.logspace(
        0, math.log10(n_nodes), curve_points).tolist()} | {n_nodes})
    evaluator = _Faithfulness(model, tokenizer, forget, attr_f, layout, order, batch_size, progress)
    curve = dict(zip(grid, evaluator(grid)))
    chosen = next(s for s in grid if curve[s] >= threshold)
    below = max([s for s in grid if s < chosen], default=0)
    while chosen - below > 1:
        mid = (chosen + below) // 2
        curve[mid] = evaluator([mid])[0]
        below, chosen = (below, mid) if curve[mid] >= threshold else (mid, chosen)
    selected = torch.zeros(n_nodes, dtype=torch.bool)
    selected[order[:chosen]] = True
    n_head_nodes = layout.n_layers * layout.n_heads
    return Circuit(
        heads=selected[:n_head_nodes].view(layout.n_layers, layout.n_heads),
        neurons=selected[n_head_nodes:].view(layout.n_layers, -1),
        neuron_block=attr_f.neuron_block,
        curve=sorted(curve.items()),
        faithfulness=curve[chosen],
        threshold=threshold,
    )


class _Faithfulness:
    """Faithfulness of the top-s nodes of ``order`` for several s in one pass over the items.
    M(model) and M(all patched) do not depend on s and are computed on the first pass only."""

    def __init__(self, model, tokenizer, items, attr: Attribution, layout: NodeLayout,
                 order: Tensor, batch_size: int, progress: bool):
        self.model, self.layout, self.order, self.attr = model, layout, order, attr
        self.progress = progress
        neutral = (_neutral_ids(tokenizer, attr.neutral_stem)
                   if attr.counterfactual == "stem_swap" else None)
        self.rows = _build_rows(tokenizer, items, attr.scoring, neutral)
        self.batch_size = batch_size
        self.pad_id = _pad_id(tokenizer)
        self.reference: tuple[float, float] | None = None

    def __call__(self, sizes: list[int]) -> list[float]:
        model, layout, attr = self.model, self.layout, self.attr
        embed = model.get_input_embeddings()
        keeps = [_keep_masks(self.order[:s], layout, attr.neuron_block, embed.weight.device)
                 for s in sizes]
        totals = torch.zeros(len(sizes), dtype=torch.float64)
        clean_total = patched_total = 0.0
        batches = _batches(self.rows, self.batch_size, self.pad_id, embed.weight.device)
        with _eval_mode(model), torch.no_grad():
            for batch in tqdm(batches, total=math.ceil(len(self.rows) / self.batch_size),
                              desc=f"faithfulness ({len(sizes)} sizes)", disable=not self.progress):
                embeds = embed(batch.clean)
                if attr.baseline is None:
                    source: dict = {}
                    with _node_hooks(model, layout, _capture(source)):
                        _logits(model, embed(batch.corrupt), batch)
                else:
                    source = attr.baseline.acts
                if self.reference is None:
                    clean_total += float(_row_metric(_logits(model, embeds, batch), batch,
                                                     attr.scoring).sum())
                    with _node_hooks(model, layout, _patch_all(source)):
                        logits = _logits(model, embeds, batch)
                    patched_total += float(_row_metric(logits, batch, attr.scoring).sum())
                for i, keep in enumerate(keeps):
                    with _node_hooks(model, layout, _patch_outside(keep, source)):
                        logits = _logits(model, embeds, batch)
                    totals[i] += float(_row_metric(logits, batch, attr.scoring).sum())
        if self.reference is None:
            if abs(clean_total - patched_total) <= 1e-6 * max(1.0, abs(clean_total)):
                raise ValueError("faithfulness is undefined: patching every node to the "
                                 "counterfactual leaves M unchanged on these items")
            self.reference = (clean_total, patched_total)
        clean_total, patched_total = self.reference
        return ((totals - patched_total) / (clean_total - patched_total)).tolist()


def _keep_masks(nodes: Tensor, layout: NodeLayout, neuron_block: int, device) -> dict:
    """(kind, layer) -> [width] bool: the activation units that stay clean."""
    n_head_nodes = layout.n_layers * layout.n_heads
    heads = torch.zeros(n_head_nodes, dtype=torch.bool)
    blocks = torch.zeros(layout.n_layers * layout.n_blocks(neuron_block), dtype=torch.bool)
    heads[nodes[nodes < n_head_nodes]] = True
    blocks[nodes[nodes >= n_head_nodes] - n_head_nodes] = True
    heads = heads.view(layout.n_layers, -1).repeat_interleave(layout.head_dim, dim=1)
    neurons = blocks.view(layout.n_layers, -1).repeat_interleave(neuron_block, dim=1)
    keep = {}
    for layer in range(layout.n_layers):
        keep[HEADS, layer] = heads[layer].to(device)
        keep[NEURONS, layer] = neurons[layer, : layout.n_neurons].to(device)
    return keep


def _patch_outside(keep: dict, source: dict) -> _NodeFn:
    def fn(kind, layer, z):
        return torch.where(keep[kind, layer].to(z.device), z, source[kind, layer])

    return fn


# ---------------------------------------------------------------------------------------------
# The circuit's parameters


def parameter_mask(model: nn.Module, circuit: Circuit) -> dict[str, Tensor]:
    """param name -> bool tensor of its shape: the entries the circuit's nodes own.

    Head h of layer l owns its q rows, the rows of its kv head h * n_kv // n_heads in k and v, and
    its column slice of the output projection; neuron j owns row j of gate/up (fc_in) and column j
    of down (fc_out). The biases of the owned q/k/v and fc_in rows are owned too; the output
    projections' biases are shared by all nodes and are not. Conv1D (GPT-2) stores (in, out), so
    its rows and columns swap. Only parameters with at least one owned entry appear."""
    layout = node_layout(model)
    structure = layout.structure
    out_axis, in_axis = (1, 0) if structure.conv1d else (0, 1)
    hd, group = layout.head_dim, layout.n_heads // layout.n_kv_heads
    mask: dict[str, Tensor] = {}

    def own(relative: str, layer: int, axis: int, index: Tensor, with_bias: bool) -> None:
        module = model.get_submodule(layout.module_name(layer, relative))
        params = [("weight", axis)] + ([("bias", 0)] if with_bias else [])
        for param_name, param_axis in params:
            param = getattr(module, param_name, None)
            if param is None:
                continue
            name = f"{layout.module_name(layer, relative)}.{param_name}"
            if name not in mask:
                mask[name] = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            mask[name].index_fill_(param_axis, index.to(param.device), True)

    for layer in range(layout.n_layers):
        heads = circuit.heads[layer].nonzero()[:, 0]
        if heads.numel():
            q = _unit_slices(heads, hd)
            kv = _unit_slices(heads.div(group, rounding_mode="floor").unique(), hd)
            if structure.qkv_layout == "separate":
                for relative, index in zip(structure.qkv, (q, kv, kv)):
                    own(relative, layer, out_axis, index, with_bias=True)
            elif structure.qkv_layout == "blocks":
                width = layout.n_heads * hd
                own(structure.qkv[0], layer, out_axis,
                    torch.cat([q, q + width, q + 2 * width]), with_bias=True)
            else:  # per_head: head h's q, k, v are rows [3 h hd, 3 (h + 1) hd)
                own(structure.qkv[0], layer, out_axis, _unit_slices(heads, 3 * hd),
                    with_bias=True)
            own(structure.head_out, layer, in_axis, q, with_bias=False)
        blocks = circuit.neurons[layer].nonzero()[:, 0]
        if blocks.numel():
            neurons = _unit_slices(blocks, circuit.neuron_block)
            neurons = neurons[neurons < layout.n_neurons]
            for relative in structure.neuron_in:
                own(relative, layer, out_axis, neurons, with_bias=True)
            own(structure.neuron_out, layer, in_axis, neurons, with_bias=False)
    return mask


def _unit_slices(units: Tensor, width: int) -> Tensor:
    """Indices [u * width, (u + 1) * width) of every unit u."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def mask_share(mask: dict[str, Tensor], model: nn.Module) -> float:
    """Share of all the model's parameters that the mask holds."""
    total = sum(p.numel() for p in model.parameters())
    return sum(int(m.sum()) for m in mask.values()) / total


# ---------------------------------------------------------------------------------------------
# Plot


def plot_attribution(before: Attribution, after: Attribution, path, *,
                     labels: tuple[str, str] = ("θ0", "θu"), max_columns: int = 128):
    """PNG: heads (layer x head) and neurons (layer x neuron block, adjacent blocks summed into
    at most ``max_columns`` columns) of two attributions side by side, one colour scale per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_column = math.ceil(before.neurons.shape[1] / max_columns)
    panels = [(before.heads, after.heads, "heads", "head"),
              (_fold(before.neurons, per_column), _fold(after.neurons, per_column), "neurons",
               f"neuron group ({before.neuron_block * per_column} neurons each)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False, layout="constrained")
    for row, (left, right, title, xlabel) in enumerate(panels):
        limit = float(max(left.abs().max(), right.abs().max())) or 1.0
        for col, (scores, label) in enumerate(((left, labels[0]), (right, labels[1]))):
            ax = axes[row][col]
            image = ax.imshow(scores.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit,
                              vmax=limit, interpolation="nearest")
            ax.set(title=f"{label}: {title}", xlabel=xlabel, ylabel="layer")
            for axis in (ax.xaxis, ax.yaxis):
                axis.get_major_locator().set_params(integer=True)
        fig.colorbar(image, ax=axes[row].tolist(), label="EAP-IG score")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fold(scores: Tensor, per_column: int) -> Tensor:
    return _block_sum(scores, per_column) if per_column > 1 else scores


# ---------------------------------------------------------------------------------------------
# Per-item attribution (mansu.cad): every noise-floor half is a mean of rows computed once


@dataclass
class ItemAttribution:
    """``attribute``'s numbers kept per item. ``scores`` [n_items, n_nodes] (flat node order) and
    ``diffs`` (kind, layer) -> [n_items, width]: each node unit's z(x) - z(x~) summed over the
    positions where M reads the answer and over the item's rows.
    ``attribution`` is their mean, the same as ``attribute`` on these items."""

    scores: Tensor
    diffs: dict
    attribution: Attribution
    direct: Tensor | None = None  # [n_items, n_nodes]: each node's direct effect on M (readout)

    @property
    def n_items(self) -> int:
        return self.scores.shape[0]

    def keep_units(self, circuit: Circuit) -> ItemAttribution:
        """Only the circuit's units' diffs (what CAD reads), to keep θ0's cached copy small."""
        layout_keep = circuit_units(circuit, self.diffs)
        return ItemAttribution(self.scores, {k: v[:, layout_keep[k]] for k, v in self.diffs.items()},
                               self.attribution, self.direct)


def circuit_units(circuit: Circuit, diffs: dict) -> dict:
    """(kind, layer) -> [width] bool: the activation units of the circuit's nodes."""
    keep = {}
    for (kind, layer), values in diffs.items():
        width = values.shape[-1]
        if kind == HEADS:
            heads = circuit.heads[layer]
            keep[kind, layer] = heads.repeat_interleave(width // heads.numel())
        else:
            keep[kind, layer] = circuit.neurons[layer].repeat_interleave(circuit.neuron_block)[:width]
    return keep


def attribute_items(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCQ] | Sequence[str],
    *,
    scoring: str = "cloze",
    counterfactual: str = "stem_swap",
    ig_steps: int = 5,
    batch_size: int = 8,
    neuron_block: int = 1,
    mean_items: Sequence[MCQ] | Sequence[str] | None = None,
    neutral_stem: str = NEUTRAL_STEM,
    readout: Tensor | None = None,
    progress: bool = True,
) -> ItemAttribution:
    """``attribute`` with the scores and node activation differences kept per item, at the same
    cost (the same passes; only the sums are split by item). ``direct`` is each node's direct
    effect on M through ``readout`` ([vocab, d_model], default this model's ``readout_matrix``):
    Σ over M's read entries of weight · <readout[token], W_out,v (z_v(x) - z_v(x~))>."""
    _check_settings(scoring, counterfactual, ig_steps, neuron_block)
    if not items:
        raise ValueError("no items to attribute")
    layout = node_layout(model)
    baseline = None
    if counterfactual == "mean":
        if not mean_items:
            raise ValueError("counterfactual='mean' needs mean_items (the retain questions)")
        baseline = mean_baseline(model, tokenizer, mean_items, scoring=scoring,
                                 batch_size=batch_size)
    neutral = _neutral_ids(tokenizer, neutral_stem) if counterfactual == "stem_swap" else None
    rows = _build_rows(tokenizer, items, scoring, neutral)
    n = len(items)
    n_blocks = layout.n_blocks(neuron_block)
    heads = torch.zeros(n, layout.n_layers, layout.n_heads)
    neurons = torch.zeros(n, layout.n_layers, n_blocks)
    diffs: dict = {}
    direct_heads = torch.zeros(n, layout.n_layers, layout.n_heads)
    direct_neurons = torch.zeros(n, layout.n_layers, n_blocks)
    metric_clean, metric_corrupt = torch.zeros(n), torch.zeros(n)
    device = model.get_input_embeddings().weight.device
    readout = (readout_matrix(model) if readout is None else readout).to(device)
    projections = _output_projections(model, layout)
    batches = _batches(rows, batch_size, _pad_id(tokenizer), device)
    with _eval_mode(model):
        for batch in tqdm(batches, total=math.ceil(len(rows) / batch_size), desc="attribution",
                          disable=not progress):
            clean_embeds, corrupt_embeds, batch_diffs, m_clean, m_corrupt = _endpoints(
                model, layout, batch, scoring, baseline)
            metric_clean.index_add_(0, batch.items, m_clean.cpu())
            metric_corrupt.index_add_(0, batch.items, m_corrupt.cpu())
            read = batch.keep[..., None]
            for key, diff in batch_diffs.items():
                per_row = (diff * read).sum(1).cpu()
                if key not in diffs:
                    diffs[key] = torch.zeros(n, per_row.shape[-1])
                diffs[key].index_add_(0, batch.items, per_row)
                direct = _direct_effect(diff, batch, readout, projections[key].to(device)).cpu()
                if key[0] == HEADS:
                    direct_heads[:, key[1]].index_add_(
                        0, batch.items, direct.view(-1, layout.n_heads, layout.head_dim).sum(-1))
                else:
                    direct_neurons[:, key[1]].index_add_(0, batch.items,
                                                         _block_sum(direct, neuron_block))
            for k in range(1, ig_steps + 1):
                row_heads, row_neurons = _ig_step_rows(
                    model, layout, batch, scoring, batch_diffs,
                    corrupt_embeds + (k / ig_steps) * (clean_embeds - corrupt_embeds))
                heads.index_add_(0, batch.items, row_heads)
                neurons.index_add_(0, batch.items, _block_sum(
                    row_neurons.flatten(0, 1), neuron_block).view(-1, layout.n_layers, n_blocks))
    heads, neurons = heads / ig_steps, neurons / ig_steps
    mean = Attribution(heads=heads.mean(0), neurons=neurons.mean(0), metric_clean=metric_clean,
                       metric_corrupt=metric_corrupt, scoring=scoring,
                       counterfactual=counterfactual, neuron_block=neuron_block,
                       ig_steps=ig_steps, neutral_stem=neutral_stem, baseline=baseline)
    return ItemAttribution(torch.cat([heads.flatten(1), neurons.flatten(1)], 1), diffs, mean,
                           torch.cat([direct_heads.flatten(1), direct_neurons.flatten(1)], 1))


_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")


def readout_matrix(model: nn.Module) -> Tensor:
    """float32 [vocab, d_model]: the unembedding with the final norm's gain folded in, i.e. how a
    residual-stream vector is read as logits up to the norm's per-position scale."""
    unembed = model.get_output_embeddings().weight.detach().float()
    for name in _FINAL_NORMS:
        norm = _find(model, name)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return unembed * norm.weight.detach().float()
    return unembed


def _output_projections(model: nn.Module, layout: NodeLayout) -> dict:
    """(kind, layer) -> float32 [d_model, width] output projection (dequantized if 4/8-bit)."""
    dequantized = {}
    if any(hasattr(getattr(m, "weight", None), "quant_state") or hasattr(getattr(m, "weight", None), "SCB")
           for m in model.modules()):
        from mansu.quantization import dequantized_state

        dequantized = dequantized_state(model)
    out = {}
    for layer in range(layout.n_layers):
        for kind, relative in ((HEADS, layout.structure.head_out),
                               (NEURONS, layout.structure.neuron_out)):
            name = layout.module_name(layer, relative) + ".weight"
            weight = dequantized.get(name)
            if weight is None:
                weight = model.get_parameter(name).detach()
                weight = weight.T if layout.structure.conv1d else weight
            out[kind, layer] = weight.float()
    return out


def _direct_effect(diff: Tensor, batch: _Batch, readout: Tensor, projection: Tensor) -> Tensor:
    """[B, width]: per row and unit, Σ_entries weight · readout[token] · W_out[:, unit] · diff at
    the entry's position."""
    positions = batch.keep.nonzero()  # kept logits come row-major, as batch.entry_logit indexes
    at_entry = diff[positions[batch.entry_logit, 0], positions[batch.entry_logit, 1]]  # [E, width]
    read = (readout[batch.entry_tok] * batch.entry_weight[:, None]) @ projection  # [E, width]
    return torch.zeros(diff.shape[0], diff.shape[-1], device=diff.device).index_add_(
        0, batch.entry_row, read * at_entry)


def _ig_step_rows(model, layout: NodeLayout, batch: _Batch, scoring: str, diffs: dict,
                  embeds: Tensor) -> tuple[Tensor, Tensor]:
    """``_ig_step`` without the sum over rows: [B, L, H] and [B, L, N]."""
    acts: dict = {}
    with torch.enable_grad():
        embeds = embeds.detach().requires_grad_(True)
        with _node_hooks(model, layout, _capture(acts)):
            metric = _row_metric(_logits(model, embeds, batch), batch, scoring).sum()
        keys = list(acts)
        grads = torch.autograd.grad(metric, [acts[key] for key in keys], allow_unused=True)
    rows = batch.clean.shape[0]
    heads = torch.zeros(rows, layout.n_layers, layout.n_heads)
    neurons = torch.zeros(rows, layout.n_layers, layout.n_neurons)
    for (kind, layer), grad in zip(keys, grads):
        if grad is None:
            continue
        per_unit = (grad.float() * diffs[kind, layer]).sum(1).cpu()
        if kind == HEADS:
            heads[:, layer] = per_unit.view(rows, layout.n_heads, layout.head_dim).sum(-1)
        else:
            neurons[:, layer] = per_unit
    return heads, neurons
