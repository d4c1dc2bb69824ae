"""The four verdicts of a run (docs/method.md §6), under one of two protocols (``eval.verdicts``):

- ``deployed`` (the default): every property is judged on Q(θu), the model a user runs, with
  statistics over questions (paired bootstrap, resampling questions):
  * forgetting: acc_forget(θ0) − max(acc_forget(Q(θu)), chance) ≥ min_forgetting. Forgetting
    counts down to chance only: a model that picks wrong answers more often than chance still
    tells the right one apart, so going below chance earns nothing (``answer_avoidance`` flags a
    forget accuracy whose interval lies below chance);
  * retain preservation: non-inferiority on every retain split that is scored (the eval part of
    the retain facts, MMLU when present): the lower bound of acc(Q(θu)) − acc(θ0) ≥ −retain_margin;
  * quantization permanence, three outcomes: the share of θu's forgetting that NF4 brings back
    net of θ0's own rounding, ((Q(θu) − θu) − (Q(θ0) − θ0)) / (θ0 − θu) on the forget questions,
    *holds* when its upper bound ≤ max_share_back; *reversal* when the net gap's lower bound is
    > 0 and the net gap exceeds the matched-noise control's gap; *inconclusive* otherwise; a
    method whose θu forgot less than min_forgetting has *nothing to keep*, never *holds*;
  * structural erasure: CAD − floor of Q(θu) ≥ min_cad_over_floor (not yet at matched β).
- ``point``: the project's first rule, kept for comparison: point estimates on θu (forgetting
  θ0 − θu ≥ min_forgetting, retain drop ≤ max_retain_drop, PTQ gap ≤ max_ptq_gap, CAD − floor of
  θu ≥ min_cad_over_floor), which one question can flip.

A property whose metric was not measured has holds = None, never a pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROTOCOLS = ("deployed", "point")
PERMANENCE_OUTCOMES = ("holds", "reversal", "inconclusive", "nothing to keep")


def judge(metrics: dict, correct: dict, chance: Sequence[float], settings, seed: int) -> dict:
    """The record's verdicts under ``settings.verdicts``; under ``deployed`` the first rule's
    verdicts on θu are kept beside them (``verdicts_point``)."""
    point = point_verdicts(metrics, min_forgetting=settings.min_forgetting,
                           max_retain_drop=settings.max_retain_drop,
                           max_ptq_gap=settings.max_ptq_gap,
                           min_cad_over_floor=settings.min_cad_over_floor)
    if settings.verdicts == "point":
        return {"verdicts": point}
    deployed = deployed_verdicts(metrics, correct, chance, min_forgetting=settings.min_forgetting,
                                 retain_margin=settings.retain_margin,
                                 max_share_back=settings.max_share_back,
                                 min_cad_over_floor=settings.min_cad_over_floor,
                                 iters=settings.bootstrap_iters, seed=seed)
    return {"verdicts": deployed, "verdicts_point": point}


def point_verdicts(metrics: dict, *, min_forgetting: float, max_retain_drop: float,
                   max_ptq_gap: float, min_cad_over_floor: float) -> dict:
    """margin > 0 means the property holds with that much to spare."""
    acc = metrics["accuracy"]
    forgetting = acc["theta0"]["forget"]["accuracy"] - acc["thetau"]["forget"]["accuracy"]
    retain_drop = acc["theta0"]["retain"]["accuracy"] - acc["thetau"]["retain"]["accuracy"]
    gap = metrics.get("ptq_gap", {}).get("value")
    cad = metrics.get("cad", {}).get("cad_minus_floor")
    return {
        "forgetting": _threshold(forgetting, min_forgetting, ">="),
        "retain_preservation": _threshold(retain_drop, max_retain_drop, "<="),
        "quantization_permanence": _threshold(gap, max_ptq_gap, "<="),
        # CAD's definition (mansu.cad.divergence.DEFINITION) is the one its controls showed to tell
        # erasure from downstream suppression; the verdict names it.
        "structural_erasure": {**_threshold(cad, min_cad_over_floor, ">="),
                               "definition": metrics.get("cad", {}).get("definition")},
    }


def deployed_verdicts(metrics: dict, correct: dict, chance: Sequence[float], *,
                      min_forgetting: float, retain_margin: float, max_share_back: float,
                      min_cad_over_floor: float, iters: int = 1000, seed: int = 0) -> dict:
    """`correct[model][split]`: per-question outcomes of theta0, thetau, q_theta0, q_thetau;
    `chance[i]`: 1 / number of choices of forget question i."""
    rng = np.random.default_rng(seed)
    forget = {name: np.asarray(splits["forget"], dtype=float) for name, splits in correct.items()}
    n = len(forget["theta0"])
    resamples = rng.integers(0, n, size=(max(iters, 1), n))
    return {
        "forgetting": forgetting_verdict(forget, np.asarray(chance, dtype=float), resamples,
                                         min_forgetting),
        "retain_preservation": retain_verdict(correct, retain_margin, iters, seed),
        "quantization_permanence": permanence_verdict(forget, resamples, min_forgetting,
                                                      max_share_back,
                                                      metrics.get("noise_control")),
        "structural_erasure": {
            **_threshold(metrics.get("cad", {}).get("cad_q_minus_floor"), min_cad_over_floor, ">="),
            "definition": metrics.get("cad", {}).get("definition"), "model": "q_thetau",
            "matched_beta": False},
    }


def forgetting_verdict(forget: dict, chance: np.ndarray, resamples: np.ndarray,
                       min_forgetting: float) -> dict:
    deployed = "q_thetau" if "q_thetau" in forget else "thetau"
    level = float(chance.mean())
    acc0, accq = forget["theta0"].mean(), forget[deployed].mean()
    value = float(acc0 - max(accq, level))
    low, high = _interval(forget[deployed][resamples].mean(axis=1))
    return {**_threshold(value, min_forgetting, ">="), "model": deployed, "chance": level,
            "accuracy": float(accq), "ci_low": low, "ci_high": high,
            "distance_to_chance": float(accq - level), "answer_avoidance": bool(high < level)}


def retain_verdict(correct: dict, margin: float, iters: int, seed: int) -> dict:
    deployed = "q_thetau" if "q_thetau" in correct else "thetau"
    splits = {}
    for split in correct["theta0"]:
        if split == "forget":
            continue
        diff = _paired(correct["theta0"][split], correct[deployed][split], iters, seed)
        splits[split] = {**diff, "holds": bool(diff["ci_low"] >= -margin)}
    if not splits:
        return {"holds": None, "value": None, "threshold": -margin, "margin": None,
                "model": deployed, "splits": {}}
    worst = min(splits.values(), key=lambda s: s["ci_low"])
    return {"holds": all(s["holds"] for s in splits.values()), "value": worst["ci_low"],
            "threshold": -margin, "margin": worst["ci_low"] + margin, "model": deployed,
            "splits": splits}


def permanence_verdict(forget: dict, resamples: np.ndarray, min_forgetting: float,
                       max_share_back: float, noise_control: dict | None) -> dict:
    if "q_thetau" not in forget or "q_theta0" not in forget:
        return {"holds": None, "outcome": None, "value": None, "threshold": max_share_back,
                "margin": None}
    a0, au, q0, qu = (forget[k] for k in ("theta0", "thetau", "q_theta0", "q_thetau"))
    forgot = a0 - au
    net = (qu - au) - (q0 - a0)
    forgetting, net_gap = float(forgot.mean()), float(net.mean())
    net_low, net_high = _interval(net[resamples].mean(axis=1))
    base = {"threshold": max_share_back, "forgetting": forgetting, "net_gap": net_gap,
            "net_gap_ci": [net_low, net_high]}
    if forgetting < min_forgetting:
        return {**base, "holds": None, "outcome": "nothing to keep", "value": None, "margin": None,
                "share_ci": [None, None]}
    forgot_resampled = forgot[resamples].mean(axis=1)
    shares = np.where(forgot_resampled > 0, net[resamples].mean(axis=1)
                      / np.where(forgot_resampled > 0, forgot_resampled, 1.0), np.inf)
    share = net_gap / forgetting
    share_low, share_high = _interval(shares)
    noise = (noise_control or {}).get("value")
    if share_high is not None and share_high <= max_share_back:
        outcome = "holds"
    elif net_low > 0 and (noise is None or net_gap > noise):
        outcome = "reversal"
    else:
        outcome = "inconclusive"
    return {**base, "holds": {"holds": True, "reversal": False}.get(outcome), "outcome": outcome,
            "value": share, "share_ci": [share_low, share_high],
            "margin": None if share_high is None else max_share_back - share_high,
            "noise_gap": noise}


def _paired(before: Sequence[bool], after: Sequence[bool], iters: int, seed: int) -> dict:
    from mansu.stats import paired_bootstrap

    return paired_bootstrap(list(before), list(after), iters=iters, seed=seed)


def _interval(values: np.ndarray) -> tuple[float, float | None]:
    """95% percentile interval; the upper bound is None (unbounded) when a resample had no
    forgetting to divide by (its share of forgetting brought back is undefined)."""
    if not np.isfinite(values).all():
        return float(np.quantile(values, 0.025, method="lower")), None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _threshold(value, threshold: float, sense: str) -> dict:
    if value is None:
        return {"holds": None, "value": None, "threshold": threshold, "margin": None}
    margin = value - threshold if sense == ">=" else threshold - value
    return {"holds": bool(margin >= 0), "value": value, "threshold": threshold, "margin": margin}
