"""MANSU's entry point: the steps of docs/method.md §4 in order, each in the module named for it.

1. circuit and mask ............ mask.py   (the θ0 circuit from the launcher, random, or full)
2. retain statistics ........... retain.py (three disjoint retain sets: null space, cost, held out)
3. null-space projection ....... nullspace.py
4. forget optimisation ......... forget.py + optimizer.py (AdamW on the masked entries only)
5. floor, chosen under budget .. floor.py + budget.py (knapsack of forget gain against retain cost)
6. certificate ................. certificate.py (bitsandbytes' own codes)
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from mansu.attribution.circuit import Circuit
from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import LOSS_TOKENS, encoded_batches, scored_answer_starts, text_batches
from mansu.unlearn.checks import UnlearnResult, check_common_knobs, require
from mansu.unlearn.likelihood import mean_nll
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.mansu.budget import candidate_order, check_budget, diagonal_prefix, measured_prefix
from mansu.unlearn.mansu.certificate import flag_failed_certificate, nf4_certificate
from mansu.unlearn.mansu.floor import FLOOR_MODES, apply_floor, masked_targets, stochastic_choice
from mansu.unlearn.mansu.forget import FORGET_LOSSES, forget_encoded, forget_gradient, forget_objective
from mansu.unlearn.mansu.mask import (
    CIRCUITS,
    build_mask,
    flat_values,
    only_trainable,
    quantizable_linears,
    random_circuit,
    write_flat,
)
from mansu.unlearn.mansu.nullspace import NULLSPACES, projector
from mansu.unlearn.mansu.optimizer import MaskedAdamW
from mansu.unlearn.mansu.retain import mean_token_nll, nullspace_statistics, retain_cost, retain_texts

log = logging.getLogger("mansu.unlearn.mansu")


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            lr: float = 1e-5, max_steps: int = 100, batch_size: int = 4, beta: float = 0.1,
            forget_loss: Literal["npo", "ga", "logit"] = "npo",
            loss_tokens: Literal["answer", "all"] = "answer",
            nullspace: Literal["fisher", "activation", "none"] = "fisher",
            energy: float = 0.99, n_retain: int = 64, n_fisher: int = 64, n_heldout: int = 64,
            fisher: Literal["sampled", "empirical_text"] = "sampled",
            budget: Literal["measured", "diagonal", "none"] = "measured",
            retain_budget: float = 0.05, floor: bool = True,
            floor_mode: Literal["knapsack", "next_code", "stochastic"] = "knapsack",
            circuit: Literal["attributed", "random", "full"] = "attributed",
            target_forget_acc: float | None = None, eval_every: int = 10,
            retain_weight: float = 0.0, weight_decay: float = 0.0, max_length: int = 512,
            blocksize: int = 64,
            skip_modules: tuple[str, ...] = ("lm_head",),
            max_gradient_bytes: int = 4 * 2**30) -> UnlearnResult:
    """MANSU on ``model`` in place (knobs: conf/method/mansu.yaml). ``info`` records the circuit,
    the mask, the null-space rank, the budget's cut, predicted and measured retain-loss changes
    (Fisher texts and held-out texts), the floor and its certificate."""
    check_common_knobs("mansu", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=target_forget_acc, eval_every=eval_every)
    _check_knobs(retain, beta=beta, forget_loss=forget_loss, loss_tokens=loss_tokens,
                 nullspace=nullspace, energy=energy, sizes=(n_retain, n_fisher, n_heldout),
                 circuit=circuit, floor_mode=floor_mode, weight_decay=weight_decay,
                 blocksize=blocksize, retain_weight=retain_weight)
    check_budget(budget, retain_budget)
    linears = quantizable_linears(model, tuple(skip_modules))
    require(bool(linears), f"mansu: {type(model).__name__} has no quantizable layer (no nn.Linear "
                           f"outside skip_modules={tuple(skip_modules)}), so there is nothing "
                           "the NF4 floor could act on")
    chosen_circuit = choose_circuit(model, ctx, circuit)
    masked, mask_info = build_mask(model, linears, chosen_circuit, blocksize)
    texts = retain_texts(tokenizer, retain, loss_tokens=loss_tokens, n_nullspace=n_retain,
                         n_fisher=n_fisher, n_heldout=n_heldout, seed=ctx.seed,
                         max_length=max_length, fit=ctx.retain_fit)
    encoded_forget = forget_encoded(tokenizer, forget, loss_tokens, max_length)
    require(bool(encoded_forget), "mansu: no forget text has a token to score")
    device = ctx.device
    with only_trainable(model, [m.param for m in masked]):
        stats = nullspace_statistics(model, texts.nullspace, masked, device,
                                     keep_gradients=nullspace == "fisher",
                                     covariances=nullspace == "activation",
                                     max_gradient_bytes=max_gradient_bytes)
        cost_model = retain_cost(model, texts.fisher, masked, device, kind=fisher, seed=ctx.seed)
        gain_gradient = forget_gradient(model, encoded_forget, masked, device, batch_size)
        heldout_before = mean_token_nll(model, texts.heldout, device)
        project, rank = projector(nullspace, masked, stats, energy)
        del stats  # the projector holds what it needs
        objective = forget_objective(forget_loss, model, encoded_forget, device, beta=beta,
                                     batch_size=batch_size)
        optimizer = MaskedAdamW(masked, ctx.storage, lr=lr, weight_decay=weight_decay,
                                project=project)
        forget_batches = text_batches(tokenizer, forget.corpus, batch_size=batch_size,
                                      seed=ctx.seed, device=device, max_length=max_length,
                                      answer_starts=scored_answer_starts(forget, loss_tokens))
        # GradDiff's retain NLL, on the null-space texts only, so the budget's texts and the
        # held-out check stay unseen by training
        retain_batches = encoded_batches(texts.nullspace, batch_size=batch_size,
                                         seed=ctx.seed + 1, device=device)

        def closure():
            loss = objective(next(forget_batches))
            if retain_weight > 0:
                loss = loss + retain_weight * mean_nll(model, next(retain_batches))
            optimizer.backward(loss)
            return loss.detach()

        result = run_unlearning(model, tokenizer, forget, ctx, optimizer, closure,
                                max_steps=max_steps, stop_forget_acc=target_forget_acc,
                                eval_every=eval_every)
    heldout_trained = mean_token_nll(model, texts.heldout, device)
    theta0, trained = flat_values(masked)
    moved = trained != theta0

    # What will be written: each candidate's floored target, or its trained value without a floor.
    if floor:
        displaced, candidates = masked_targets(masked)
        if floor_mode == "stochastic":
            generator = torch.Generator().manual_seed(ctx.seed)
            candidates = stochastic_choice(theta0, trained, displaced, candidates, generator)
    else:
        displaced, candidates = trained, moved
    delta = displaced - theta0
    cost = cost_model.curvature(delta)
    gain = gain_gradient * delta
    order = candidate_order(candidates, cost, gain if floor_mode == "knapsack" else None)

    def fisher_change(indices):
        values = theta0.clone()
        values[indices] = displaced[indices]
        write_flat(masked, values)
        return mean_token_nll(model, texts.fisher, device) - cost_model.nll

    trace: list[list[float]] = []
    if budget == "none":
        kept = order.numel()
    elif budget == "diagonal":
        kept = diagonal_prefix(order, cost, retain_budget)
    else:
        kept, trace = measured_prefix(order, fisher_change, retain_budget)
    chosen = torch.zeros_like(candidates)
    chosen[order[:kept]] = True

    write_flat(masked, trained)
    if floor:
        floor_info = apply_floor(masked, chosen)
        certified = [m.index_floored for m in masked]
    else:
        write_flat(masked, torch.where(chosen, trained, theta0))
        floor_info = {}
        certified = [part for part in chosen.split([m.index.numel() for m in masked])]
    certificate = nf4_certificate(masked, certified, blocksize)
    if floor:
        flag_failed_certificate(certificate)
    final = flat_values(masked)[1] - theta0
    fisher_after = mean_token_nll(model, texts.fisher, device)
    heldout_after = mean_token_nll(model, texts.heldout, device)
    predicted = float(cost_model.curvature(final).sum())
    n_quantized = sum(linear.weight.numel() for linear in linears.values())
    result.info.update(
        method="mansu", forget_loss=forget_loss, loss_tokens=loss_tokens,
        retain_weight=retain_weight,
        trained_parameters=int(moved.numel()),
        circuit={"kind": circuit, **(chosen_circuit.to_json() if chosen_circuit is not None
                                     else {})},
        mask={**mask_info, "share_of_parameters": moved.numel() / _n_parameters(model),
              "share_of_quantized": moved.numel() / n_quantized},
        updated={"entries": int((final != 0).sum()),
                 "share_of_quantized": int((final != 0).sum()) / n_quantized},
        nullspace={"kind": nullspace, "energy": energy, "rank": rank},
        optimizer_state_entries=optimizer.state_entries(),
        budget={"mode": budget, "retain_budget": retain_budget, "order": floor_mode
                if floor_mode == "knapsack" else "cost", "candidates": int(candidates.sum()),
                "without_gain": int(candidates.sum()) - order.numel()
                if floor_mode == "knapsack" else 0,
                "kept": kept, "dropped": order.numel() - kept, "trace": trace},
        retain_loss={
            "fisher": fisher, "texts": texts.sizes(),
            "predicted_increase": predicted if budget != "measured"
            else fisher_after - cost_model.nll,
            "predicted_diagonal": predicted,
            "first_order_term": float(cost_model.first_order(final).sum()),
            "measured_fisher_texts": fisher_after - cost_model.nll,
            "measured_heldout": heldout_after - heldout_before,
            "measured_heldout_before_floor": heldout_trained - heldout_before,
            "before_fisher": cost_model.nll, "before_heldout": heldout_before},
        floor={"enabled": floor, "mode": floor_mode, "moved_by_training": int(moved.sum()),
               **floor_info},
        certificate=certificate)
    _log_summary(result.info)
    return result


def _check_knobs(retain: Split, *, beta: float, forget_loss: str, loss_tokens: str,
                 nullspace: str, energy: float, sizes: tuple[int, int, int], circuit: str,
                 floor_mode: str, weight_decay: float, blocksize: int,
                 retain_weight: float) -> None:
    for name, value, options in (("forget_loss", forget_loss, FORGET_LOSSES),
                                 ("loss_tokens", loss_tokens, LOSS_TOKENS),
                                 ("nullspace", nullspace, NULLSPACES),
                                 ("circuit", circuit, CIRCUITS),
                                 ("floor_mode", floor_mode, FLOOR_MODES)):
        require(value in options, f"mansu: {name} must be one of {options}, got {value!r}")
    require(beta > 0, f"mansu: beta must be > 0, got {beta}")
    require(0.0 < energy <= 1.0, f"mansu: energy must be in (0, 1], got {energy}")
    for name, size in zip(("n_retain", "n_fisher", "n_heldout"), sizes):
        require(size >= 1, f"mansu: {name} must be >= 1, got {size}")
    require(weight_decay >= 0, f"mansu: weight_decay must be >= 0, got {weight_decay}")
    require(retain_weight >= 0, f"mansu: retain_weight must be >= 0, got {retain_weight}")
    require(blocksize >= 1, f"mansu: blocksize must be >= 1, got {blocksize}")
    require(len(retain.corpus) > 0,
            "mansu: the retain corpus is empty; the null space and the retain budget need it")


def choose_circuit(model, ctx: RunContext, kind: str) -> Circuit | None:
    """The circuit to unlearn in, from the launcher's attribution stage only: ``attributed`` =
    ctx.circuit (selected on θ0); ``random`` = as many heads and neuron blocks (and weights) at
    random, seeded by ctx.seed; ``full`` = None, every quantized weight (no circuit needed)."""
    if kind == "full":
        return None
    require(ctx.circuit is not None,
            f"mansu: circuit={kind} needs the attribution stage's circuit (attribution=eap_ig); "
            "set method.circuit=full to unlearn every quantized weight instead")
    return ctx.circuit if kind == "attributed" else random_circuit(ctx.circuit, ctx.seed, model)


def _n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _log_summary(info: dict) -> None:
    budget, loss = info["budget"], info["retain_loss"]
    log.info("mansu: %d masked entries (%.3f%% of quantized weights), null-space rank %d, %d moved "
             "by training, %d written (%d dropped by the %s budget), NF4 code flips %s; retain "
             "NLL/token %+.4g held out vs %+.4g predicted",
             info["trained_parameters"], 100 * info["mask"]["share_of_quantized"],
             info["nullspace"]["rank"], info["floor"]["moved_by_training"],
             info["updated"]["entries"], budget["dropped"], budget["mode"],
             info["certificate"]["code_flip_share"], loss["measured_heldout"],
             loss["predicted_increase"])
