"""The evaluation stage: multiple-choice accuracy of one model on every split of the benchmark,
and, where the benchmark has general text, the model's NLL on it (a utility measure that moves
where MMLU sits at chance, as it does for a 135M model)."""

from __future__ import annotations

import torch

from mansu.data import Benchmark
from mansu.evaluate.mcq import evaluate_mcq
from mansu.settings import EvalSettings

GENERAL_TEXT = "general_text_nll"  # the key of the NLL beside the splits (not a question split)


def evaluate(model, tokenizer, benchmark: Benchmark, scoring: str, settings: EvalSettings) -> dict:
    splits = {"forget": benchmark.forget, "retain": benchmark.retain, **benchmark.extra_retain}
    results = {}
    for name, split in splits.items():
        result = evaluate_mcq(model, tokenizer, split.questions, scoring=scoring,
                              batch_size=settings.batch_size,
                              bootstrap_iters=settings.bootstrap_iters)
        results[name] = {**result.to_json(), "correct": list(result.correct)}
    if benchmark.general_text:
        per_text = text_nll(model, tokenizer, benchmark.general_text, settings.batch_size)
        results[GENERAL_TEXT] = {"mean": sum(per_text) / len(per_text), "n": len(per_text),
                                 "per_text": per_text}
    return results


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str], batch_size: int) -> list[float]:
    """Mean NLL per token of each text (every token after the first scored)."""
    from mansu.attribution.nodes import eval_mode
    from mansu.unlearn.batches import _pad_id, collate_encoded, encode_texts
    from mansu.unlearn.likelihood import _token_nll

    encoded = encode_texts(tokenizer, texts)
    device = model.get_input_embeddings().weight.device
    out: list[float] = []
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate_encoded(encoded[start:start + batch_size], _pad_id(tokenizer)).items()}
            nll, scored = _token_nll(model, batch)
            out += (nll.sum(1) / scored.sum(1)).tolist()
    return out
