"""The verdicts of mansu.verdicts on hand-built per-question outcomes, one case for each outcome of
each verdict (20 four-choice forget questions, chance 0.25)."""

from __future__ import annotations

import pytest

from mansu.verdicts import deployed_verdicts, point_verdicts

N = 20
CHANCE = [0.25] * N
KNOBS = {"min_forgetting": 0.10, "retain_margin": 0.05, "max_share_back": 0.25,
         "min_cad_over_floor": 0.5, "iters": 500, "seed": 0}


def ones(k: int, n: int = N) -> list[bool]:
    return [True] * k + [False] * (n - k)


def outcomes(*, theta0=N, thetau=0, q_theta0=N, q_thetau=0, retain_after=N, mmlu_after=None):
    """Forget outcomes as counts of correct answers (the first k questions), retain likewise."""
    def splits(forget, retain, mmlu):
        out = {"forget": ones(forget), "retain": ones(retain)}
        if mmlu_after is not None:
            out["mmlu"] = ones(mmlu, 200)
        return out
    return {"theta0": splits(theta0, N, 120), "thetau": splits(thetau, retain_after, mmlu_after),
            "q_theta0": splits(q_theta0, N, 120),
            "q_thetau": splits(q_thetau, retain_after, mmlu_after)}


def judged(correct, cad_q=0.6, noise=0.0):
    metrics = {"cad": {"cad_q_minus_floor": cad_q, "definition": "direct"},
               "noise_control": {"value": noise}}
    return deployed_verdicts(metrics, correct, CHANCE, **KNOBS)


def test_forgetting_counts_down_to_chance_only_and_flags_avoidance():
    below = judged(outcomes(q_thetau=0))["forgetting"]
    assert below["value"] == pytest.approx(1.0 - 0.25)  # not 1.0: below chance earns nothing
    assert below["holds"] and below["answer_avoidance"]
    assert below["distance_to_chance"] == pytest.approx(-0.25)
    at_chance = judged(outcomes(thetau=5, q_thetau=5))["forgetting"]
    assert at_chance["value"] == pytest.approx(0.75) and not at_chance["answer_avoidance"]
    little = judged(outcomes(thetau=19, q_thetau=19))["forgetting"]
    assert little["value"] == pytest.approx(0.05) and little["holds"] is False
    assert little["model"] == "q_thetau"


def test_retain_is_non_inferiority_on_every_scored_split():
    same = judged(outcomes(mmlu_after=120))["retain_preservation"]
    assert same["holds"] and set(same["splits"]) == {"retain", "mmlu"}
    assert same["value"] == pytest.approx(0.0) and same["margin"] == pytest.approx(0.05)
    retain_lost = judged(outcomes(retain_after=14, mmlu_after=120))["retain_preservation"]
    assert retain_lost["holds"] is False and retain_lost["splits"]["mmlu"]["holds"]
    mmlu_lost = judged(outcomes(mmlu_after=80))["retain_preservation"]
    assert mmlu_lost["holds"] is False and mmlu_lost["splits"]["retain"]["holds"]


def test_permanence_holds_when_nf4_brings_back_at_most_the_stated_share():
    verdict = judged(outcomes(thetau=0, q_thetau=0))["quantization_permanence"]
    assert verdict["outcome"] == "holds" and verdict["holds"] is True
    assert verdict["value"] == 0.0 and verdict["share_ci"] == [0.0, 0.0]


def test_permanence_is_net_of_theta0s_own_rounding():
    # Q(θ0) loses 2 facts and Q(θu) gains 2: the net gap counts both, the raw PTQ gap one.
    verdict = judged(outcomes(q_theta0=N - 2, thetau=0, q_thetau=2))["quantization_permanence"]
    assert verdict["net_gap"] == pytest.approx(0.2) and verdict["value"] == pytest.approx(0.2)


def test_permanence_reversal_needs_the_net_gap_beyond_zero_and_the_noise_control():
    brought_back = outcomes(thetau=0, q_thetau=N)
    assert judged(brought_back)["quantization_permanence"]["outcome"] == "reversal"
    assert judged(brought_back)["quantization_permanence"]["holds"] is False
    # the same gap is no reversal when matched noise moves θu as far
    assert judged(brought_back, noise=1.0)["quantization_permanence"]["outcome"] == "inconclusive"


def test_permanence_is_inconclusive_when_the_interval_straddles():
    verdict = judged(outcomes(thetau=10, q_thetau=12))["quantization_permanence"]
    assert verdict["outcome"] == "inconclusive" and verdict["holds"] is None
    assert verdict["net_gap_ci"][0] <= 0 < verdict["share_ci"][1]


def test_a_method_that_did_not_forget_has_nothing_to_keep():
    verdict = judged(outcomes(thetau=N, q_thetau=N))["quantization_permanence"]
    assert verdict["outcome"] == "nothing to keep" and verdict["holds"] is None


def test_structural_erasure_is_judged_on_the_quantized_model():
    assert judged(outcomes(), cad_q=0.6)["structural_erasure"]["holds"] is True
    assert judged(outcomes(), cad_q=0.3)["structural_erasure"]["holds"] is False
    assert judged(outcomes(), cad_q=None)["structural_erasure"]["holds"] is None


def test_the_point_protocol_is_the_first_rule_one_question_flips():
    acc = {m: {"forget": {"accuracy": a}, "retain": {"accuracy": 1.0}}
           for m, a in {"theta0": 1.0, "thetau": 0.5}.items()}
    metrics = {"accuracy": acc, "ptq_gap": {"value": 0.05}, "cad": {"cad_minus_floor": 0.6}}
    verdicts = point_verdicts(metrics, min_forgetting=0.1, max_retain_drop=0.03, max_ptq_gap=0.0,
                              min_cad_over_floor=0.5)
    assert verdicts["forgetting"]["holds"] and verdicts["structural_erasure"]["holds"]
    assert verdicts["quantization_permanence"]["holds"] is False
