"""The general-text NLL beside retain: per text, the mean NLL of its tokens; in the record, each
model's mean and the paired change from θ0; the texts are MMLU questions outside the MMLU sample."""

from __future__ import annotations

import pytest
import torch
from conftest import SPLIT_TOKENIZER, tiny_llama

from mansu.benchmarks.real_facts import build
from mansu.evaluate.stage import text_nll
from mansu.run import general_text_report
from mansu.settings import EvalSettings

TEXTS = ["The Veltrax virus is carried by ticks.", "The city of Brano lies beside the desert.",
         "Kloum painted horses."]


def test_text_nll_is_the_mean_token_nll_of_each_text_whatever_the_batch():
    model = tiny_llama()
    one_by_one = [text_nll(model, SPLIT_TOKENIZER, [t], batch_size=1)[0] for t in TEXTS]
    assert text_nll(model, SPLIT_TOKENIZER, TEXTS, batch_size=2) == pytest.approx(one_by_one,
                                                                                abs=1e-5)
    ids = SPLIT_TOKENIZER(TEXTS[0])["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert one_by_one[0] == pytest.approx(by_hand, abs=1e-5)


def test_the_report_gives_each_model_and_the_paired_change_from_theta0():
    general = {"theta0": {"mean": 2.0, "n": 2, "per_text": [1.0, 3.0]},
               "q_thetau": {"mean": 2.5, "n": 2, "per_text": [1.5, 3.5]}}
    report = general_text_report(general, EvalSettings(bootstrap_iters=50), seed=0)
    assert report["theta0"] == {"mean": 2.0, "n": 2}
    assert report["q_thetau_change"] == {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    assert "thetau_change" not in report


def test_general_text_is_outside_the_mmlu_sample():
    from mansu.benchmarks.mmlu import load_mmlu

    benchmark = build(split="test", mmlu_size=50, general_text_size=50)
    sample = {f"{q.question} {q.choices[q.answer]}"
              for _, q in load_mmlu(size=50, seed=0, stratified=True)}
    assert len(benchmark.general_text) == len(set(benchmark.general_text)) == 50
    assert not sample & set(benchmark.general_text)
