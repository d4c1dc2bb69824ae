"""Representation misdirection for unlearning (RMU, Li et al. 2024, WMDP: centerforaisafety/wmdp
rmu/unlearn.py). Steer the output of decoder layer `layer_id` on forget text toward a fixed
random direction c·u, and keep it equal to the frozen θ0's on retain text:
L = MSE(h_θ(forget), c·u) + α·MSE(h_θ(retain), h_ref(retain)), training only the parameters
named by `param_patterns`.

Topics: the reference cycles over forget corpora (bio, cyber), one control vector, steering
coefficient and α per topic. A Split is one topic, so the lists hold one value each here.
u = rand(1, 1, d) uniform in [0, 1), normalised, drawn from a generator seeded with ctx.seed.

`param_patterns` are glob patterns (fnmatch: `*` matches anything, dots included) over the names
of ``model.named_parameters()``, with `{a,b,c}` alternatives, e.g.
``model.layers.{5,6,7}.mlp.down_proj.weight`` or ``transformer.h.*.mlp.c_proj.weight``.
Left null, it is the MLP output projection of layers layer_id-2 .. layer_id (the reference's
5,6,7 with layer 7), found for Llama/Mistral/Qwen/Gemma (`mlp.down_proj`), GPT-2
(`mlp.c_proj`) and GPT-NeoX (`mlp.dense_4h_to_h`).
"""

from __future__ import annotations

import itertools
import re
from fnmatch import fnmatchcase

import torch
from torch import nn

from mansu.unlearn.batches import text_batches
from mansu.unlearn.checks import UnlearnResult, require
from mansu.unlearn.losses import rmu_loss
from mansu.unlearn.reference import frozen_copy
from mansu.unlearn.scaffold import Training, baseline

DECODER_LAYER_LISTS = ("model.layers", "model.language_model.layers", "transformer.h",
                       "gpt_neox.layers", "model.decoder.layers")
MLP_OUTPUT_WEIGHTS = ("mlp.down_proj.weight", "mlp.c_proj.weight", "mlp.dense_4h_to_h.weight")


@baseline("rmu", lr=5e-5, max_steps=150, without=("loss_tokens", "train_embeddings"))
def unlearn(training: Training, *, layer_id: int = 7, param_patterns: list[str] | None = None,
            steering_coeffs: tuple[float, ...] = (6.5,), alphas: tuple[float, ...] = (1200.0,)
            ) -> UnlearnResult:
    model, ctx, knobs = training.model, training.ctx, training.knobs
    require(len(training.retain.corpus) > 0, "rmu: the retain corpus is empty")
    topics = [training.forget.corpus]
    require(len(steering_coeffs) == len(topics) and len(alphas) == len(topics),
            f"rmu: steering_coeffs and alphas need one value per forget topic ({len(topics)}), "
            f"got {len(steering_coeffs)} and {len(alphas)}")
    layers_path, layers = decoder_layers(model)
    require(0 <= layer_id < len(layers),
            f"rmu: layer_id {layer_id} is beyond the model's depth ({len(layers)} decoder "
            f"layers, ids 0..{len(layers) - 1})")
    patterns = (param_patterns if param_patterns is not None
                else default_param_patterns(layers_path, layers, layer_id))
    named = select_parameters(model, patterns)

    reference = frozen_copy(model)
    reference_layer = decoder_layers(reference)[1][layer_id]
    optimizer = training.optimizer([p for _, p in named])
    generator = torch.Generator().manual_seed(ctx.seed)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    controls = []
    for coeff in steering_coeffs:
        u = torch.rand(1, 1, hidden_size, generator=generator)
        controls.append((u / u.norm() * coeff).to(ctx.device))
    # Raw text, every token scored, one seeded stream per topic and one for the retain corpus.
    batching = {"batch_size": knobs.batch_size, "device": ctx.device,
                "max_length": knobs.max_length}
    forget_batches = [text_batches(training.tokenizer, texts, seed=ctx.seed + i, **batching)
                      for i, texts in enumerate(topics)]
    retain_batches = text_batches(training.tokenizer, training.retain.corpus,
                                  seed=ctx.seed + len(topics), **batching)
    topic_order = itertools.cycle(range(len(topics)))

    def closure():
        topic = next(topic_order)
        forget_batch, retain_batch = next(forget_batches[topic]), next(retain_batches)
        with torch.no_grad():
            h_retain_ref = layer_output(reference, reference_layer, retain_batch)
        loss = rmu_loss(layer_output(model, layers[layer_id], forget_batch), controls[topic],
                        layer_output(model, layers[layer_id], retain_batch), h_retain_ref,
                        alphas[topic], forget_batch["attention_mask"],
                        retain_batch["attention_mask"])
        optimizer.backward(loss)
        return loss.detach()

    return training.run(optimizer, closure,
                        info={"layer_id": layer_id, "trained_names": [name for name, _ in named]})


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers and its path, for the architectures named above."""
    for path in DECODER_LAYER_LISTS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise ValueError(f"rmu: no decoder layer list found in {type(model).__name__}; "
                     f"looked for {', '.join(DECODER_LAYER_LISTS)}")


def default_param_patterns(layers_path: str, layers: nn.ModuleList, layer_id: int) -> list[str]:
    local = dict(layers[layer_id].named_parameters())
    found = [name for name in MLP_OUTPUT_WEIGHTS if name in local]
    if not found:
        raise ValueError(f"rmu: no MLP output projection ({', '.join(MLP_OUTPUT_WEIGHTS)}) in "
                         f"layer {layer_id}; give param_patterns explicitly")
    return [f"{layers_path}.{i}.{found[0]}" for i in range(max(0, layer_id - 2), layer_id + 1)]


def select_parameters(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Parameters whose name matches a pattern; a pattern that matches none is an error."""
    require(len(patterns) > 0, "rmu: param_patterns is empty")
    named = list(model.named_parameters())
    selected = {}
    for pattern in patterns:
        alternatives = expand_braces(pattern)
        matches = [(n, p) for n, p in named if any(fnmatchcase(n, a) for a in alternatives)]
        require(len(matches) > 0, f"rmu: param pattern {pattern!r} matches no parameter "
                                  f"(names look like {named[0][0]!r})")
        selected.update(matches)
    return list(selected.items())


def expand_braces(pattern: str) -> list[str]:
    """'a.{1,2}.b' -> ['a.1.b', 'a.2.b'] (several groups multiply out)."""
    group = re.search(r"\{([^{}]*)\}", pattern)
    if group is None:
        return [pattern]
    head, tail = pattern[:group.start()], pattern[group.end():]
    return [e for option in group.group(1).split(",") for e in expand_braces(head + option + tail)]


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the hooked layer is needed."""


def layer_output(model: nn.Module, layer: nn.Module, batch: dict) -> torch.Tensor:
    """The hidden states [B, T, d] that `layer` outputs on `batch` (the forward stops there)."""
    captured = []

    def capture(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = layer.register_forward_hook(capture)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]
