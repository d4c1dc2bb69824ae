"""Controls that CAD can fail (scripts/cad_controls.py, tests/cad/test_cad.py), on a model and its
forget items, against the circuit selected on θ0:

1. ``suppression``: θ0's last-layer MLP neurons outside the circuit (their input rows and output
   columns) and the final norm's gain, parameters no circuit node reads from, trained to lower
   the ``objective`` (default ``contrast``: M(x) - M(x~), what the question adds to M) to
   ``target_beta`` of θ0's.
   Every circuit node's activation stays bit-identical; only what comes after it changed.
2. ``erasure``: the circuit's own parameters (``parameter_mask``) trained the same way to the same
   β: the circuit itself stops computing the answer, by whatever change descent finds.
3. ``none``: θ0 itself.
4. ``random``: a Gaussian edit of the suppression's parameters with the suppression's norm.
A CAD definition passes when (2) - (1) is large and (3), (4) stay near 0, each minus its floor.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mansu.attribution.circuit import Circuit, parameter_mask
from mansu.attribution.eap_ig import attribute
from mansu.attribution.items import (
    attribute_items,
    circuit_units,
    final_norm_name,
    readout_matrix,
    write_gradients,
)
from mansu.attribution.metric import (
    NEUTRAL_STEM,
    build_rows,
    counterfactual_rows,
    iter_batches,
    kept_logits,
    pad_id_of,
    row_metric,
)
from mansu.attribution.nodes import capture, node_hooks, node_layout
from mansu.attribution.selection import select
from mansu.cad.divergence import cad_report, noise_floors, output_weights

CONTROLS = ("suppression", "erasure", "none", "random")
# ``clean`` lets descent lower M by a question-independent shift against the answer tokens, which
# a circuit can write as well as a late MLP; ``contrast`` must remove what the question adds.
OBJECTIVES = ("contrast", "clean")


def mean_metric(model: nn.Module, tokenizer, items: Sequence, *, scoring: str,
                batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Mean M over ``items`` (attribution's metric) on the clean inputs and on their neutral-stem
    counterfactuals x~, differentiable."""
    rows = counterfactual_rows(tokenizer, items, scoring, "stem_swap", NEUTRAL_STEM)
    embed = model.get_input_embeddings()
    clean, counterfactual = 0.0, 0.0
    for batch in iter_batches(rows, batch_size, pad_id_of(tokenizer), embed.weight.device):
        clean = clean + row_metric(kept_logits(model, embed(batch.clean), batch), batch,
                                   scoring).sum()
        counterfactual = counterfactual + row_metric(
            kept_logits(model, embed(batch.corrupt), batch), batch, scoring).sum()
    return clean / len(items), counterfactual / len(items)


@torch.no_grad()
def circuit_activations(model: nn.Module, tokenizer, items: Sequence, circuit: Circuit, *,
                        scoring: str, batch_size: int = 16) -> list[Tensor]:
    """The circuit units' activations z on the clean inputs, one tensor per batch and layer."""
    layout = node_layout(model)
    rows = build_rows(tokenizer, items, scoring, None)
    embed = model.get_input_embeddings()
    out = []
    for batch in iter_batches(rows, batch_size, pad_id_of(tokenizer), embed.weight.device):
        acts: dict = {}
        with node_hooks(model, layout, capture(acts)):
            kept_logits(model, embed(batch.clean), batch)
        units = circuit_units(circuit, {k: v.flatten(0, 1) for k, v in acts.items()})
        out += [acts[key][..., keep].cpu() for key, keep in sorted(units.items()) if keep.any()]
    return out


def downstream_mask(model: nn.Module, circuit: Circuit) -> dict[str, Tensor]:
    """The parameters of the last layer's MLP neurons outside the circuit and the final norm's
    gain: nothing any circuit node computes depends on them."""
    layout = node_layout(model)
    outside = torch.zeros_like(circuit.neurons)
    outside[-1] = ~circuit.neurons[-1]
    after = Circuit(heads=torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.bool),
                         neurons=outside, neuron_block=circuit.neuron_block)
    mask = parameter_mask(model, after) if outside.any() else {}
    norm = final_norm_name(model)
    if norm is not None:
        gain = model.get_parameter(f"{norm}.weight")
        mask[f"{norm}.weight"] = torch.ones_like(gain, dtype=torch.bool)
    if not mask:
        raise ValueError("nothing lies after the circuit to suppress with (it holds every neuron "
                         "of the last layer and the model has no final norm)")
    return mask


def descend(model: nn.Module, tokenizer, items: Sequence, mask: dict[str, Tensor], *,
            scoring: str, target_beta: float, lr: float, max_steps: int, objective: str,
            batch_size: int = 16) -> dict:
    """Adam on the masked entries only, lowering the ``objective`` (``clean``: mean M;
    ``contrast``: mean M(x) - M(x~)) until it and mean M are both ≤ target_beta × θ0's."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown control objective {objective!r}; expected one of {OBJECTIVES}")
    params = dict(model.named_parameters())
    trained = {name: params[name] for name in mask}
    frozen = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name in trained)
    optimizer = torch.optim.Adam(trained.values(), lr=lr)
    start = None
    try:
        for step in range(max_steps + 1):
            clean, counterfactual = mean_metric(model, tokenizer, items, scoring=scoring,
                                                batch_size=batch_size)
            metric = clean - counterfactual if objective == "contrast" else clean
            now = (float(metric.detach()), float(clean.detach()))
            start = now if start is None else start
            if (now[0] <= target_beta * start[0] and now[1] <= target_beta * start[1]) \
                    or step == max_steps:
                break
            optimizer.zero_grad()
            metric.backward()
            for name, p in trained.items():
                p.grad.mul_(mask[name])
            optimizer.step()
    finally:
        for name, p in params.items():
            p.requires_grad_(frozen[name])
            p.grad = None
    return {"steps": step, "objective": objective, "objective_ratio": now[0] / start[0],
            "beta_train": now[1] / start[1]}


def edit_norm(model: nn.Module, reference: nn.Module) -> float:
    ref = dict(reference.named_parameters())
    return float(sum(((p.detach().double() - ref[n].detach().double()) ** 2).sum()
                     for n, p in model.named_parameters()) ** 0.5)


@torch.no_grad()
def random_edit(model: nn.Module, mask: dict[str, Tensor], norm: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    noise = {name: torch.randn(m.shape, generator=generator) * m.cpu() for name, m in mask.items()}
    scale = norm / float(sum((x.double() ** 2).sum() for x in noise.values()) ** 0.5)
    for name, x in noise.items():
        params[name].add_((x * scale).to(params[name].device, params[name].dtype))


def run_controls(model: nn.Module, tokenizer, forget: Sequence, retain: Sequence, *,
                 attribute_kwargs: dict, selection: dict | None = None,
                 target_beta: float = 0.5, lr: float = 1e-2, max_steps: int = 200,
                 splits: int = 200, objective: str = "contrast", seed: int = 0,
                 progress: bool = False) -> dict:
    """θ0's circuit (``selection``: ``mansu.attribution.selection.select``'s keywords, as
    ``AttributionSettings.selection_kwargs``; default the sufficiency rule at 0.8) and floors, then
    every control's CAD report (θ0 is left as it was). With a weight-level circuit (``necessity``)
    the erasure trains the circuit's selected weights only."""
    kwargs = {**attribute_kwargs, "progress": progress}
    theta0 = attribute_items(model, tokenizer, forget, **kwargs)
    retain_attr = attribute(model, tokenizer, retain, **kwargs)
    selection = {"rule": "sufficiency", "batch_size": kwargs.get("batch_size", 8),
                 **(selection or {})}
    circuit = select(model, tokenizer, forget, retain, theta0.attribution, retain_attr,
                     attribute_kwargs=kwargs, seed=seed, progress=progress, **selection)
    weights0 = output_weights(model, circuit)
    readout0 = readout_matrix(model)
    gradients0, theta0.frozen = write_gradients(model, tokenizer, forget, weights0, **kwargs)
    floors = noise_floors(theta0, circuit, weights0, splits=splits, seed=seed)
    train = dict(scoring=kwargs["scoring"], target_beta=target_beta, lr=lr, max_steps=max_steps,
                 objective=objective, batch_size=kwargs.get("batch_size", 16))
    results = {}
    suppressed = copy.deepcopy(model)
    below = downstream_mask(model, circuit)
    results["suppression"] = descend(suppressed, tokenizer, forget, below, **train)
    norm = edit_norm(suppressed, model)
    erased = copy.deepcopy(model)
    results["erasure"] = descend(erased, tokenizer, forget, parameter_mask(model, circuit),
                                 **train)
    noisy = copy.deepcopy(model)
    random_edit(noisy, below, norm, seed)
    results["random"] = {}
    results["none"] = {}
    edited = {"suppression": suppressed, "erasure": erased, "none": model, "random": noisy}
    clean0 = circuit_activations(model, tokenizer, forget, circuit, scoring=kwargs["scoring"])
    for name in CONTROLS:
        items = attribute_items(edited[name], tokenizer, forget, readout=readout0,
                                frozen_gradients=gradients0, **kwargs)
        clean = circuit_activations(edited[name], tokenizer, forget, circuit,
                                    scoring=kwargs["scoring"])
        results[name]["circuit_activations_identical"] = all(
            torch.equal(a, b) for a, b in zip(clean, clean0))
        results[name]["circuit_activation_max_change"] = max(
            float((a - b).abs().max()) for a, b in zip(clean, clean0))
        results[name]["edit_norm"] = edit_norm(edited[name], model)
        results[name]["report"] = cad_report(theta0, items, circuit, weights0=weights0,
                                             weightsu=output_weights(edited[name], circuit),
                                             floors=floors)
    return {"circuit": circuit.to_json(), "floors": floors, "controls": results}
