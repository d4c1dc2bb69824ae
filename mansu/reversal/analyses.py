"""Does quantization undo the unlearning, and by what mechanism? (docs/method.md §2, issue "Does NF4
undo unlearning here")

Model-level analyses run after θu and Q(θu) exist; the tensor-level arithmetic lives in
mansu.reversal.diagnostics. A PTQ gap counts as a reversal only beyond what untargeted noise of the
quantizer's own error size does (the noise control), and the first-order decomposition says whether
the change is quantization error any nearby model would get, or rounding of the update itself.
"""

from __future__ import annotations

import copy
import random

import torch

from mansu.evaluate.mcq import choice_logprobs
from mansu.quantize.quantizer import dequantized_state, quantize_model, quantize_tensor
from mansu.reversal.diagnostics import first_order_decomposition, noise_like_quantization
from mansu.stats import paired_bootstrap


def forget_correct(model, tokenizer, questions, *, scoring: str, batch_size: int) -> list[bool]:
    predictions = choice_logprobs(model, tokenizer, questions, scoring=scoring,
                                  batch_size=batch_size).argmax(1).tolist()
    return [p == q.answer for p, q in zip(predictions, questions)]


def with_weights(model, weights: dict[str, torch.Tensor]):
    """A copy of `model` with some weights replaced (cast to the stored dtype, on its device)."""
    other = copy.deepcopy(model)
    state = other.state_dict()
    other.load_state_dict({n: w.to(device=state[n].device, dtype=state[n].dtype)
                           for n, w in weights.items()}, strict=False)
    return other


def noise_control(model, quantized: dict[str, torch.Tensor], thetau_correct: list[bool],
                  tokenizer, questions, *, scoring: str, batch_size: int, seed: int,
                  iters: int) -> dict:
    """Forget-accuracy change of θu plus Gaussian noise of each tensor's own quantization-error
    RMS (paired over questions against θu), beside which a PTQ gap is judged."""
    state = {n: t.detach().cpu() for n, t in model.state_dict().items() if n in quantized}
    noise = noise_like_quantization(state, quantized, seed)
    noisy = with_weights(model, {n: noise[n] for n in quantized})
    correct = forget_correct(noisy, tokenizer, questions, scoring=scoring, batch_size=batch_size)
    return paired_bootstrap(thetau_correct, correct, iters=iters, seed=seed)


def format_gaps(model, thetau_correct: list[bool], tokenizer, questions, *, formats: list[str],
                blocksize: int, skip_modules: list[str], scoring: str, batch_size: int, seed: int,
                iters: int) -> dict:
    """PTQ gap under other formats (fp4, int8, ...), each beside its own matched noise control."""
    out = {}
    for quant_type in formats:
        qmodel = quantize_model(model, quant_type=quant_type, blocksize=blocksize,
                                skip_modules=tuple(skip_modules))
        correct = forget_correct(qmodel, tokenizer, questions, scoring=scoring,
                                 batch_size=batch_size)
        quantized = dequantized_state(qmodel)
        del qmodel
        out[quant_type] = {
            "ptq_gap": paired_bootstrap(thetau_correct, correct, iters=iters, seed=seed),
            "noise_control": noise_control(model, quantized, thetau_correct, tokenizer,
                                           questions, scoring=scoring, batch_size=batch_size,
                                           seed=seed, iters=iters),
        }
    return out


def corpus_nll(model, tokenizer, texts: list[str], *, batch_size: int = 16,
               grad: bool = False) -> torch.Tensor:
    """Mean token NLL over `texts` (the forget loss whose change quantization is asked about)."""
    device = model.get_input_embeddings().weight.device
    total, count = torch.zeros((), device=device), 0
    with torch.set_grad_enabled(grad):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=512).to(device)
            logits = model(**batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
            total = total + nll
            count += int(mask.sum())
    return total / max(count, 1)


def first_order(model, theta0: dict[str, torch.Tensor], quantized_u: dict[str, torch.Tensor],
                tokenizer, corpus: list[str], *, quant_type: str, blocksize: int, seed: int,
                max_texts: int = 256) -> dict:
    """g = ∂(forget NLL)/∂θ at θu on the quantized weights; predicted change g·(Q(θu) − θu) split
    into base error g·(Q(θ0) − θ0) and update rounding g·(Q(θu) − Q(θ0) − Δ), beside the measured
    change NLL(Q(θu)) − NLL(θu) (Q(θu) as dequantized weights in θu's own copy)."""
    texts = corpus if len(corpus) <= max_texts else random.Random(seed).sample(corpus, max_texts)
    names = list(quantized_u)
    params = dict(model.named_parameters())
    was_training, flags = model.training, {n: p.requires_grad for n, p in params.items()}
    model.eval()
    for name, p in params.items():
        p.requires_grad_(name in quantized_u)
    try:
        loss_u = corpus_nll(model, tokenizer, texts, grad=True)
        grads = torch.autograd.grad(loss_u, [params[n] for n in names])
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
        model.train(was_training)
    grad = {n: g.detach().float().cpu() for n, g in zip(names, grads)}
    thetau = {n: params[n].detach().float().cpu() for n in names}
    q0 = {n: quantize_tensor(theta0[n], quant_type, blocksize).float().cpu() for n in names}
    qu = {n: quantized_u[n].float().cpu() for n in names}
    parts = first_order_decomposition(grad, {n: theta0[n].float() for n in names}, thetau, q0, qu)
    with torch.no_grad():
        measured = corpus_nll(with_weights(model, qu), tokenizer, texts) - loss_u.detach()
    return {**parts, "measured": float(measured), "forget_nll_thetau": loss_u.item(),
            "n_texts": len(texts)}
