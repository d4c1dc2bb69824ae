"""The attribution stage: EAP-IG on θ0, the forget circuit, and what CAD later compares against."""

from __future__ import annotations

from mansu.attribution.circuit import mask_share, parameter_mask
from mansu.attribution.eap_ig import attribute
from mansu.attribution.items import attribute_items, readout_matrix, write_gradients
from mansu.attribution.selection import select
from mansu.cad.divergence import noise_floors, output_weights
from mansu.data import Benchmark
from mansu.settings import AttributionSettings


def attribution_items(questions: list, max_items: int | None, seed: int) -> list:
    if max_items is None or len(questions) <= max_items:
        return list(questions)
    import random

    return random.Random(seed).sample(list(questions), max_items)


def attribute_theta0(model, tokenizer, benchmark: Benchmark, settings: AttributionSettings,
                     scoring: str, seed: int) -> dict:
    """EAP-IG on θ0 for the forget and retain items, the circuit, and CAD's noise floors. It is
    cached per θ0, so its item sample and noise-floor splits take a fixed seed, not the run's:
    every seed of a sweep is then compared against the same circuit. The forget items are
    attributed per item once, so the floors' random halves need no further pass; θ0's gradients
    at the circuit's outputs are kept for the ``frozen`` CAD (one more pass)."""
    forget = attribution_items(benchmark.forget.questions, settings.max_items, seed)
    # the retain part the pipeline fits to: the scored part stays unseen
    fit = benchmark.retain_fit if benchmark.retain_fit is not None else benchmark.retain
    retain = attribution_items(fit.questions, settings.max_items, seed)
    kwargs = settings.attribute_kwargs(scoring)
    mean_items = retain if settings.counterfactual == "mean" else None
    forget_items = attribute_items(model, tokenizer, forget, mean_items=mean_items, **kwargs)
    retain_attr = attribute(model, tokenizer, retain, mean_items=mean_items, **kwargs)
    circuit = select(model, tokenizer, forget, retain, forget_items.attribution, retain_attr,
                     attribute_kwargs={**kwargs, "mean_items": mean_items}, seed=seed,
                     **settings.selection_kwargs())
    circuit_share = mask_share(parameter_mask(model, circuit), model)
    weights = output_weights(model, circuit)
    gradients, forget_items.frozen = write_gradients(model, tokenizer, forget, weights,
                                                     mean_items=mean_items, **kwargs)
    floors = noise_floors(forget_items, circuit, weights, seed=seed)
    return {"forget_items": forget, "mean_items": mean_items,
            "forget": forget_items.keep_units(circuit), "weights": weights,
            "gradients": gradients,
            "readout": readout_matrix(model).cpu(), "circuit": circuit,
            "parameter_share": circuit_share, "noise_floors": floors}
