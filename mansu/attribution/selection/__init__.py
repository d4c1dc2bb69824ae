"""Circuit selection from EAP-IG scores on θ0, by one of two rules (``attribution.select``):
``sufficiency`` (forget-specificity order, grown until faithfulness on the forget items reaches a
threshold: sufficiency.py) or ``necessity`` (ablation removes the forget metric but not the retain
one, then a per-weight cut to a parameter budget: necessity.py)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mansu.attribution.ablation import PatchEvaluator
from mansu.attribution.circuit import Circuit
from mansu.attribution.eap_ig import Attribution
from mansu.attribution.selection.necessity import FisherCache, select_necessary, stability
from mansu.attribution.selection.sufficiency import select_circuit

RULES = ("necessity", "sufficiency")


def select(model: nn.Module, tokenizer, forget: Sequence, retain: Sequence, attr_f: Attribution,
           attr_r: Attribution, *, rule: str, threshold: float = 0.8, lam: float = 1.0,
           forget_removed: float = 0.5, retain_removed: float = 0.2,
           share_of_parameters: float = 0.005, max_evaluations: int = 40, curve_points: int = 8,
           retain_floor: float = 0.1, check_stability: bool = True,
           skip_modules: Sequence[str] = ("lm_head",), batch_size: int = 8,
           attribute_kwargs: dict | None = None, seed: int = 0, progress: bool = True) -> Circuit:
    """The circuit by ``rule``; with ``necessity`` and ``check_stability`` its report also holds
    the rule's stability across two halves of ``forget`` (``attribute_kwargs`` attribute them)."""
    if rule not in RULES:
        raise ValueError(f"attribution.select: unknown rule {rule!r}; expected one of {RULES}")
    if rule == "sufficiency":
        return select_circuit(model, tokenizer, forget, attr_f, attr_r, threshold=threshold,
                              lam=lam, batch_size=batch_size, progress=progress)
    knobs = dict(forget_removed=forget_removed, retain_removed=retain_removed,
                 share_of_parameters=share_of_parameters, max_evaluations=max_evaluations,
                 retain_floor=retain_floor, skip_modules=skip_modules, batch_size=batch_size,
                 progress=progress)
    retain_eval = PatchEvaluator(model, tokenizer, retain, attr_r, batch_size=batch_size,
                                 progress=progress, desc="retain ablation")
    retain_fisher = FisherCache(model, tokenizer, retain, attr_r)
    circuit = select_necessary(model, tokenizer, forget, retain, attr_f, attr_r,
                               curve_points=curve_points, retain_eval=retain_eval,
                               retain_fisher=retain_fisher, **knobs)
    if check_stability:
        circuit.report["stability"] = stability(
            model, tokenizer, forget, retain, attr_r, attribute_kwargs=attribute_kwargs or {},
            seed=seed, retain_eval=retain_eval, retain_fisher=retain_fisher, **knobs)
    return circuit
