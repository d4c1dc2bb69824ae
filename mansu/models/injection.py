"""Knowledge injection: teach a freshly built model the benchmark's facts (forget and retain
alike), so that there is knowledge to unlearn. Plain next-token training on the statements."""

from __future__ import annotations

import logging
import math
import random
import time

import torch
from tqdm.auto import tqdm

from mansu.data import Benchmark

log = logging.getLogger(__name__)


def inject_knowledge(model, tokenizer, benchmark: Benchmark, *, steps: int, lr: float,
                     batch_size: int, target_accuracy: float, seed: int,
                     check_every: int = 250) -> dict:
    """Train until forget and retain cloze accuracy both reach target_accuracy (checked every
    `check_every` steps) or `steps` run out; returns what was reached, for the cache's metadata."""
    from mansu.evaluate.mcq import choice_logprobs

    texts = benchmark.all_texts()
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    start, accuracy, step = time.perf_counter(), {}, 0
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(steps), desc="inject facts", mininterval=2.0)
    for step in bar:
        batch = tokenizer(rng.sample(texts, min(batch_size, len(texts))), return_tensors="pt",
                          padding=True).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % check_every == 0 or step + 1 == steps:
            accuracy = {name: cloze_accuracy(choice_logprobs, model, tokenizer, split)
                        for name, split in (("forget", benchmark.forget),
                                            ("retain", benchmark.retain))}
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in accuracy.items()})
            model.train()
            if min(accuracy.values()) >= target_accuracy:
                break
    model.eval()
    if min(accuracy.values(), default=0.0) < target_accuracy:
        log.warning("knowledge injection stopped at %s, below the target %.2f; raise "
                    "model.inject_steps", accuracy, target_accuracy)
    return {"steps": step + 1, "final_loss": loss.item(), "accuracy": accuracy,
            "seconds": round(time.perf_counter() - start, 1)}


def cloze_accuracy(choice_logprobs, model, tokenizer, split) -> float:
    predictions = choice_logprobs(model, tokenizer, split.questions, scoring="cloze").argmax(1)
    return float(sum(int(p) == q.answer for p, q in zip(predictions, split.questions))
                 / len(split.questions))
