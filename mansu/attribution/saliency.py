"""The parameter-level cut inside a set of nodes: per-weight forget-versus-retain saliency.

For every entry w of the quantized Linear weights the nodes own, the empirical Fisher of the
metric M (``mansu.attribution.metric``, the attribution's scoring) on each side, F(w) = sum over items of
(dM_i/dw)^2, one backward per item, and the saliency s(w) = F_forget(w) / (F_retain(w) + ε), with
ε = ``retain_floor`` times the mean retain Fisher over the candidates (so a weight that no item
moves is not picked for a ratio of two near-zeros). The ``budget`` entries of highest saliency
are kept. Biases and unquantized layers are left out: the floor and the NF4 gap concern the
quantized weights only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mansu.attribution.eap_ig import Attribution
from mansu.attribution.metric import build_rows, iter_batches, kept_logits, pad_id_of, row_metric
from mansu.attribution.nodes import eval_mode
from mansu.quantize.quantizer import quantized_linears


def quantized_weight_names(model: nn.Module, skip_modules: Sequence[str] = ("lm_head",)) -> dict[str, int]:
    """weight name -> entry count of every Linear layer NF4 quantization would store in 4 bits."""
    return {f"{name}.weight": module.weight.numel()
            for name, module in quantized_linears(model, skip_modules).items()}


def metric_fisher(model: nn.Module, tokenizer, items: Sequence, attr: Attribution,
                  names: Sequence[str]) -> dict[str, Tensor]:
    """name -> float32 sum over items of (dM_item / dparam)^2, for the named parameters only."""
    params = dict(model.named_parameters())
    chosen = [params[name] for name in names]
    fisher = {name: torch.zeros(params[name].shape, dtype=torch.float32,
                                device=params[name].device) for name in names}
    if not names:
        return fisher
    flags = [p.requires_grad for p in chosen]
    device = model.get_input_embeddings().weight.device
    try:
        for p in chosen:
            p.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for item in items:
                rows = build_rows(tokenizer, [item], attr.scoring, None)
                for batch in iter_batches(rows, len(rows), pad_id_of(tokenizer), device):
                    embeds = model.get_input_embeddings()(batch.clean)
                    metric = row_metric(kept_logits(model, embeds, batch), batch, attr.scoring).sum()
                    grads = torch.autograd.grad(metric, chosen, allow_unused=True)
                    for name, grad in zip(names, grads):
                        if grad is not None:
                            fisher[name] += grad.float().square()
    finally:
        for p, flag in zip(chosen, flags):
            p.requires_grad_(flag)
    return fisher


def salient_weights(owned: dict[str, Tensor], forget_fisher: dict[str, Tensor],
                    retain_fisher: dict[str, Tensor], budget: int, *,
                    retain_floor: float = 0.1) -> dict[str, Tensor]:
    """name -> flat indices (CPU int64) of the at most ``budget`` owned entries of highest saliency
    (those with a positive forget Fisher); every owned entry when there are no more than
    ``budget``."""
    names = [name for name, mask in owned.items() if bool(mask.any())]
    candidates = {name: owned[name].reshape(-1).nonzero()[:, 0].cpu() for name in names}
    total = sum(int(index.numel()) for index in candidates.values())
    if total <= budget:
        return candidates
    forget = torch.cat([forget_fisher[n].reshape(-1).cpu()[candidates[n]] for n in names])
    retain = torch.cat([retain_fisher[n].reshape(-1).cpu()[candidates[n]] for n in names])
    epsilon = retain_floor * float(retain.mean()) + torch.finfo(torch.float32).tiny
    top = torch.topk(forget / (retain + epsilon), budget).indices
    top = top[forget[top] > 0].sort().values  # an entry no forget item moves is no reason to update it
    chosen, start = {}, 0
    for name in names:
        count = int(candidates[name].numel())
        inside = top[(top >= start) & (top < start + count)] - start
        if inside.numel():
            chosen[name] = candidates[name][inside]
        start += count
    return chosen
