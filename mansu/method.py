"""MANSU (METHOD.md §4): unlearning confined to the forget circuit's weights, projected off the
retain gradients, bounded by a diagonal-Fisher retain budget, then floored onto the next NF4 code
so that post-training quantization cannot round it away.

``unlearn`` runs, on θ0:
1. the circuit (``ctx.circuit`` from the launcher's attribution stage, else attributed here; or a
   random one of the same size; or ``full``: every quantized weight) and its mask M_C;
2. one forward-backward per retain text (``n_retain`` of them): per-example gradients on M_C, the
   diagonal Fisher F_i = mean g_i², and for ``nullspace: activation`` each layer's input covariance;
3. the retain budget: the entries with the largest ½ F_i τ_i² are dropped until the floor's
   predicted retain-loss increase ½ Σ F_i τ_i² fits ``retain_budget``;
4. forget optimisation of the kept entries by an AdamW that holds them alone, every step
   projected off the retain subspace after the optimizer;
5. the magnitude floor, and its certificate from bitsandbytes itself.

Decisions this module makes where METHOD.md leaves room:
- Only weights of the Linear layers ``quantize_model`` quantizes (every ``nn.Linear`` outside
  ``skip_modules``) are in the mask. Biases, norms, embeddings and lm_head stay at θ0: bitsandbytes
  keeps them in full precision, so a floor means nothing there, and the circuit's q/k/v biases are
  a vanishing share of its parameters.
- Every element whose |w| equals its block's absmax (ties included) is left out of the mask: moving
  it would rescale its block and change other weights' codes. The floor itself also restores any
  moved absmax element, so its guarantee does not depend on the mask.
- τ_i is the larger of the distances from w_i(θ0) to its two neighbouring code values (one at the
  grid's ends): the update's sign is unknown before training, and the larger distance bounds the
  floor's displacement whichever way it goes (unless the optimisation itself crosses further).
- NPO's frozen reference enters the loss only through log π_ref(y) of each forget text, so those
  are computed once on θ0 instead of keeping a second model: same loss, one model in memory.
- ``forget_loss: logit`` = mean over the forget corpus' next tokens of relu(z_y − max_{v≠y} z_v):
  it pushes each true token's logit just below the best other token's and then stops pulling on
  it, so it cannot run away the way gradient ascent does.
- ``floor_mode: stochastic`` (not in METHOD.md) floors a moved weight with probability
  |Δ_i| / |floored_i − θ0_i| and otherwise puts it back to θ0: the quantization-permanent update
  then equals the trained one in expectation. The METHOD.md floor (``next_code``) grows every
  moved weight's step to a whole code, a sign step of one NF4 bin on the whole mask; on the tiny
  model, whose circuit holds ~46% of the parameters, it collapses retain accuracy, as METHOD.md's
  "naive floor" measurement predicts (see conf/tuning/tiny_mansu.yaml).
- A moved weight that cannot be floored is restored to θ0: a block absmax (its move would
  rescale the block), or a weight already in the grid's last code in its update's direction (Q
  maps it to Q(θ0)'s code anyway, so θu would carry an update that quantization erases).
- The floor is computed in the stored dtype: a bf16 weight is set to the bf16 value nearest
  code × absmax that still quantizes to that code. bf16 rounding (relative 2^-9) never crosses an
  NF4 boundary (each nonzero code value is >= 10% of itself from both its midpoints; 0 is
  exact), so this is the round-to-nearest value, a fixed point of Q; the certificate checks it
  rather than assumes it.
- The retain-loss change is predicted and measured on the same ``n_retain`` texts (mean over texts
  of each text's mean token NLL), the quantity whose gradients give F.
- ``nullspace: activation`` projects each weight's update on the sub-block of the rows and columns
  holding masked entries; the circuit's masks are whole rows or whole columns, so the sub-block is
  the mask. Once the budget has dropped single entries the projected step is cut back to the mask,
  which leaves it only approximately in the null space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import bitsandbytes.functional as bnb_functional
import torch
from torch import Tensor, nn

from mansu.circuit import Circuit, parameter_mask
from mansu.context import RunContext
from mansu.data import Split
from mansu.eap_ig import attribute
from mansu.losses import ga_loss, npo_loss
from mansu.quantization import NF4_CODE, NF4_MIDPOINTS, expand_blocks, normalized_blocks
from mansu.selection import select_circuit
from mansu.training import (
    Batch,
    UnlearnResult,
    check_common_knobs,
    collate,
    forward_logits,
    mean_nll,
    require,
    run_unlearning,
    sequence_logprobs,
    text_batches,
)

log = logging.getLogger(__name__)

FORGET_LOSSES = ("npo", "ga", "logit")
NULLSPACES = ("fisher", "activation", "none")
CIRCUITS = ("attributed", "random", "full")
FLOOR_MODES = ("next_code", "stochastic")
_TOP_CODE = len(NF4_CODE) - 1
# Eigenvalues below this share of the largest are numerical noise of a rank-deficient Gram matrix.
_RANK_TOLERANCE = 1e-10


def unlearn(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, *,
            lr: float = 1e-5, max_steps: int = 100, batch_size: int = 4, beta: float = 0.1,
            forget_loss: Literal["npo", "ga", "logit"] = "npo",
            nullspace: Literal["fisher", "activation", "none"] = "fisher",
            energy: float = 0.99, n_retain: int = 64, retain_budget: float = 0.05,
            floor: bool = True, floor_mode: Literal["next_code", "stochastic"] = "next_code",
            circuit: Literal["attributed", "random", "full"] = "attributed",
            ig_steps: int = 5, threshold: float = 0.8, neuron_block: int = 1,
            target_forget_acc: float | None = None, eval_every: int = 10,
            weight_decay: float = 0.0, max_length: int = 512, blocksize: int = 64,
            skip_modules: tuple[str, ...] = ("lm_head",)) -> UnlearnResult:
    """MANSU on ``model`` in place (the steps and decisions are the module docstring's; the knobs
    are described in conf/method/mansu.yaml). ``info`` records the circuit, the mask at each cut,
    the null-space rank, the predicted and measured retain-loss change, the floor and the
    certificate; ``trained_parameters`` counts masked entries, not whole tensors."""
    check_common_knobs("mansu", forget, lr=lr, max_steps=max_steps, batch_size=batch_size,
                       stop_forget_acc=target_forget_acc, eval_every=eval_every)
    _check_knobs(retain, beta=beta, forget_loss=forget_loss, nullspace=nullspace, energy=energy,
                 n_retain=n_retain, retain_budget=retain_budget, circuit=circuit,
                 floor_mode=floor_mode, weight_decay=weight_decay, blocksize=blocksize)
    linears = quantizable_linears(model, tuple(skip_modules))
    require(bool(linears), f"mansu: {type(model).__name__} has no quantizable layer (no nn.Linear "
                           f"outside skip_modules={tuple(skip_modules)}), so there is nothing "
                           "the NF4 floor could act on")
    chosen = choose_circuit(model, tokenizer, forget, retain, ctx, circuit, ig_steps=ig_steps,
                            threshold=threshold, neuron_block=neuron_block)
    masked, mask_info = build_mask(model, linears, chosen, blocksize)
    require(bool(masked), f"mansu: the mask is empty: {_describe_empty(mask_info)}")

    texts = _encode(tokenizer, _sample(retain.corpus, n_retain, ctx.seed), max_length)
    require(bool(texts), "mansu: no retain text has two tokens or more; the Fisher needs some")
    with _only_trainable(model, [m.param for m in masked]):
        stats = retain_statistics(model, texts, masked, ctx.device,
                                  keep_gradients=nullspace == "fisher",
                                  covariances=nullspace == "activation")
        cost = 0.5 * stats.fisher * torch.cat([floor_distance(m) for m in masked]).square()
        keep = within_budget(cost, retain_budget)
        mask_info.update(budget_dropped=int((~keep).sum()), entries=int(keep.sum()))
        masked, stats = _restrict(masked, stats, keep)
        projector, rank = _projector(nullspace, masked, stats, energy)
        stats = replace(stats, gradients=None, covariances={})  # the projector holds what it needs
        closure_loss = _forget_loss(forget_loss, model, tokenizer, forget.corpus, ctx,
                                    beta=beta, batch_size=batch_size, max_length=max_length)
        optimizer = MaskedAdamW(masked, ctx.storage, lr=lr, weight_decay=weight_decay,
                                project=projector)
        forget_batches = text_batches(tokenizer, forget.corpus, batch_size=batch_size,
                                      seed=ctx.seed, device=ctx.device, max_length=max_length)

        def closure():
            loss = closure_loss(next(forget_batches))
            optimizer.backward(loss)
            return loss.detach()

        result = run_unlearning(model, tokenizer, forget, ctx, optimizer, closure,
                                max_steps=max_steps, stop_forget_acc=target_forget_acc,
                                eval_every=eval_every)
    moved = sum(int(m.moved().sum()) for m in masked)
    nll_trained = _mean_text_nll(model, texts, ctx.device)
    generator = torch.Generator().manual_seed(ctx.seed) if floor_mode == "stochastic" else None
    floor_info = apply_floor(masked, generator) if floor else {}
    certified = [m.index_floored if floor else m.moved() for m in masked]
    certificate = nf4_certificate(masked, certified, blocksize)
    if floor:
        _flag_failed_certificate(certificate)
    nll_after = _mean_text_nll(model, texts, ctx.device)
    delta = torch.cat([m.current().float() - m.theta0.float() for m in masked])

    result.info.update(
        method="mansu", forget_loss=forget_loss, trained_parameters=len(delta),
        circuit={"kind": circuit, **(chosen.to_json() if chosen is not None else {})},
        mask={**mask_info, "share_of_parameters": len(delta) / _n_parameters(model)},
        nullspace={"kind": nullspace, "energy": energy, "rank": rank, "n_retain": len(texts)},
        optimizer_state_entries=optimizer.state_entries(),
        retain_loss={
            "budget": retain_budget,
            "predicted_floor_cost": float(cost[keep].sum()),
            "predicted_increase": float(0.5 * (stats.fisher * delta.square()).sum()),
            "first_order_term": float(stats.mean_gradient @ delta),
            "measured_increase": nll_after - stats.nll,
            "measured_increase_before_floor": nll_trained - stats.nll,
            "before": stats.nll, "after": nll_after},
        floor={"enabled": floor, "mode": floor_mode, "moved_by_training": moved, **floor_info},
        certificate=certificate)
    _log_summary(result.info)
    return result


def _check_knobs(retain: Split, *, beta: float, forget_loss: str, nullspace: str, energy: float,
                 n_retain: int, retain_budget: float, circuit: str, floor_mode: str,
                 weight_decay: float,
                 blocksize: int) -> None:
    require(forget_loss in FORGET_LOSSES,
            f"mansu: forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}")
    require(nullspace in NULLSPACES,
            f"mansu: nullspace must be one of {NULLSPACES}, got {nullspace!r}")
    require(circuit in CIRCUITS, f"mansu: circuit must be one of {CIRCUITS}, got {circuit!r}")
    require(floor_mode in FLOOR_MODES,
            f"mansu: floor_mode must be one of {FLOOR_MODES}, got {floor_mode!r}")
    require(beta > 0, f"mansu: beta must be > 0, got {beta}")
    require(0.0 < energy <= 1.0, f"mansu: energy must be in (0, 1], got {energy}")
    require(n_retain >= 1, f"mansu: n_retain must be >= 1, got {n_retain}")
    require(retain_budget >= 0, f"mansu: retain_budget must be >= 0, got {retain_budget}")
    require(weight_decay >= 0, f"mansu: weight_decay must be >= 0, got {weight_decay}")
    require(blocksize >= 1, f"mansu: blocksize must be >= 1, got {blocksize}")
    require(len(retain.corpus) > 0,
            "mansu: the retain corpus is empty; the Fisher budget and null space need it")


# ---------------------------------------------------------------------------------------------
# Circuit and mask


def choose_circuit(model, tokenizer, forget: Split, retain: Split, ctx: RunContext, kind: str, *,
                   ig_steps: int = 5, threshold: float = 0.8,
                   neuron_block: int = 1) -> Circuit | None:
    """The circuit to unlearn in: ``attributed`` = ctx.circuit (the launcher's, selected on θ0),
    or selected here by EAP-IG when the launcher did not run attribution; ``random`` = as many
    heads and neuron blocks at random (seeded by ctx.seed); ``full`` = None, every weight."""
    if kind == "full":
        return None
    reference = ctx.circuit
    if reference is None:
        require(bool(forget.questions) and bool(retain.questions),
                "mansu: attributing the circuit needs forget and retain questions")
        settings = {"scoring": ctx.scoring, "ig_steps": ig_steps, "neuron_block": neuron_block,
                    "progress": False}
        attr_f = attribute(model, tokenizer, forget.questions, **settings)
        attr_r = attribute(model, tokenizer, retain.questions, **settings)
        reference = select_circuit(model, tokenizer, forget.questions, attr_f, attr_r,
                                   threshold=threshold, progress=False)
    return reference if kind == "attributed" else random_circuit(reference, ctx.seed)


def random_circuit(reference: Circuit, seed: int) -> Circuit:
    """As many heads and neuron blocks as ``reference``, placed uniformly at random."""
    generator = torch.Generator().manual_seed(seed)

    def scatter(selected: Tensor) -> Tensor:
        chosen = torch.zeros(selected.numel(), dtype=torch.bool)
        chosen[torch.randperm(selected.numel(), generator=generator)[: int(selected.sum())]] = True
        return chosen.view(selected.shape)

    return Circuit(heads=scatter(reference.heads), neurons=scatter(reference.neurons),
                   neuron_block=reference.neuron_block)


def quantizable_linears(model: nn.Module, skip_modules: tuple[str, ...] = ("lm_head",)
                        ) -> dict[str, nn.Linear]:
    """weight name -> its nn.Linear, for every layer quantize_model would quantize (the same
    dotted-suffix rule for skip_modules)."""
    return {f"{name}.weight": module for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and not any(name == skip or name.endswith("." + skip) for skip in skip_modules)}


@dataclass
class MaskedWeight:
    """The masked entries of one quantized Linear weight, and where they sit in NF4 at θ0.

    ``index``: flat positions in the weight; ``theta0``: their stored values at θ0; ``scale``:
    their block's absmax (float32); ``code0``: their NF4 code at θ0. ``index_floored`` is set by
    the floor (a bool per entry)."""

    name: str
    module: nn.Linear
    index: Tensor
    theta0: Tensor
    scale: Tensor
    code0: Tensor
    index_floored: Tensor | None = None

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight

    def current(self) -> Tensor:
        return self.param.detach().reshape(-1)[self.index]

    def write(self, values: Tensor) -> None:
        self.param.data.view(-1)[self.index] = values.to(self.param.dtype)

    def moved(self) -> Tensor:
        return self.current() != self.theta0

    def subset(self, keep: Tensor) -> MaskedWeight:
        return replace(self, index=self.index[keep], theta0=self.theta0[keep],
                       scale=self.scale[keep], code0=self.code0[keep])


def build_mask(model: nn.Module, linears: dict[str, nn.Linear], circuit: Circuit | None,
               blocksize: int, chunk_blocks: int = 1 << 14) -> tuple[list[MaskedWeight], dict]:
    """The circuit's entries in the quantized weights (all of them for circuit=None), less every
    block-absmax element; and the counts at each cut. Weights are read ``chunk_blocks`` NF4 blocks
    at a time, so the float copies this needs stay small next to a large weight."""
    owned = parameter_mask(model, circuit) if circuit is not None else None
    info = {"circuit_entries": (sum(int(m.sum()) for m in owned.values()) if owned is not None
                                else sum(linear.weight.numel() for linear in linears.values())),
            "quantizable_entries": 0, "absmax_excluded": 0}
    masked = []
    for name, linear in linears.items():
        if owned is not None and name not in owned:
            continue
        flat = linear.weight.detach().reshape(-1)
        parts = []
        step = chunk_blocks * blocksize  # whole blocks, so each chunk rounds as the whole does
        for start in range(0, flat.numel(), step):
            values = flat[start:start + step]
            entries = (torch.ones_like(values, dtype=torch.bool) if owned is None
                       else owned[name].reshape(-1)[start:start + step])
            x, absmax = normalized_blocks(values, blocksize)
            scale = expand_blocks(absmax, x.numel(), blocksize)
            holders = entries & (values.float().abs() == scale)
            info["quantizable_entries"] += int(entries.sum())
            info["absmax_excluded"] += int(holders.sum())
            index = (entries & ~holders).nonzero()[:, 0]
            codes = torch.bucketize(x[index], NF4_MIDPOINTS.to(x.device))
            parts.append((index + start, values[index].clone(), scale[index], codes))
        index, theta0, scale, codes = (torch.cat(column) for column in zip(*parts))
        if index.numel():
            masked.append(MaskedWeight(name, linear, index, theta0, scale, codes.to(torch.uint8)))
    info["entries"] = sum(m.index.numel() for m in masked)
    return masked, info


def _describe_empty(info: dict) -> str:
    if info["circuit_entries"] == 0:
        return "the circuit holds no node (its parameter mask has no entry)"
    if info["quantizable_entries"] == 0:
        return (f"none of the circuit's {info['circuit_entries']} parameters is a weight of a "
                "quantized Linear layer")
    return (f"all {info['quantizable_entries']} of the circuit's quantized weights hold their "
            "block's absmax, which the floor must not move")


def _n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _only_trainable(model: nn.Module, params: Sequence[nn.Parameter]):
    """Only ``params`` require grad inside: backward computes no other weight gradient."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextmanager
def gathered_gradients(masked: Sequence[MaskedWeight]) -> Iterator[list[Tensor | None]]:
    """Collect each weight's gradient on its masked entries as backward produces it and free the
    full-size gradient at once, so at most one weight's dense gradient exists at a time. The
    yielded list holds, after backward, one flat tensor per masked weight (None if unreached)."""
    parts: list[Tensor | None] = [None] * len(masked)
    handles = []
    for i, m in enumerate(masked):
        def hook(param: Tensor, i: int = i, index: Tensor = m.index) -> None:
            gathered = param.grad.reshape(-1)[index]
            parts[i] = gathered if parts[i] is None else parts[i] + gathered
            param.grad = None

        handles.append(m.param.register_post_accumulate_grad_hook(hook))
    try:
        yield parts
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Retain statistics, budget, null space


@dataclass
class RetainStatistics:
    """Over the retain texts, on the masked entries (flat, in mask order): ``fisher`` mean g²,
    ``mean_gradient`` mean g, ``gradients`` [n, |M|] every g (fisher null space only);
    ``covariances`` weight name -> (masked columns, Σ x_J x_Jᵀ of that layer's inputs) for the
    activation null space; ``nll`` the mean over texts of each text's mean token NLL."""

    fisher: Tensor
    mean_gradient: Tensor
    gradients: Tensor | None
    covariances: dict[str, tuple[Tensor, Tensor]]
    nll: float


def retain_statistics(model: nn.Module, texts: Sequence[list[int]],
                      masked: Sequence[MaskedWeight], device, *, keep_gradients: bool,
                      covariances: bool) -> RetainStatistics:
    """One forward-backward per text (batch of one: no padding enters the covariances)."""
    n_entries = sum(m.index.numel() for m in masked)
    device_of = masked[0].index.device
    total = torch.zeros(n_entries, device=device_of)
    total_sq = torch.zeros(n_entries, device=device_of)
    gradients = (torch.zeros(len(texts), n_entries, device=device_of) if keep_gradients
                 else None)
    sums = {m.name: _masked_columns(m) for m in masked} if covariances else {}
    covs = {name: torch.zeros(len(cols), len(cols), dtype=torch.float64, device=cols.device)
            for name, cols in sums.items()}
    nll_total = 0.0
    with _eval_mode(model), _input_covariances(masked, sums, covs):
        for row, ids in enumerate(texts):
            with gathered_gradients(masked) as parts:
                loss = mean_nll(model, _as_batch(ids, device))
                loss.backward()
            g = torch.cat([_or_zeros(p, m) for p, m in zip(parts, masked)]).float()
            total += g
            total_sq += g.square()
            if gradients is not None:
                gradients[row] = g
            nll_total += float(loss.detach())
    n = len(texts)
    return RetainStatistics(fisher=total_sq / n, mean_gradient=total / n, gradients=gradients,
                            covariances={k: (sums[k], covs[k]) for k in covs}, nll=nll_total / n)


def _or_zeros(part: Tensor | None, m: MaskedWeight) -> Tensor:
    # A weight the loss does not reach (e.g. a last layer's k/v for a one-token text) gets none.
    return part if part is not None else torch.zeros(m.index.numel(), device=m.index.device)


def _masked_columns(m: MaskedWeight) -> Tensor:
    return (m.index % m.module.in_features).unique()


@contextmanager
def _input_covariances(masked: Sequence[MaskedWeight], columns: dict[str, Tensor],
                       covs: dict[str, Tensor]):
    handles = []
    for m in masked:
        if m.name not in columns:
            continue

        def hook(module, args, output, name=m.name):
            x = args[0].detach().reshape(-1, args[0].shape[-1])[:, columns[name]].double()
            covs[name] += x.T @ x

        handles.append(m.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def floor_distance(m: MaskedWeight) -> Tensor:
    """τ per masked entry (float32): the larger distance from θ0 to a neighbouring code value."""
    code = NF4_CODE.to(m.scale.device)
    j = m.code0.long()
    w = m.theta0.float()
    up = torch.where(j < _TOP_CODE, (code[(j + 1).clamp(max=_TOP_CODE)] * m.scale - w).abs(), 0)
    down = torch.where(j > 0, (code[(j - 1).clamp(min=0)] * m.scale - w).abs(), 0)
    return torch.maximum(up, down)


def within_budget(cost: Tensor, budget: float) -> Tensor:
    """bool per entry: the largest-cost entries dropped until the rest's total fits ``budget``."""
    order = cost.argsort()
    n_keep = int((cost[order].double().cumsum(0) <= budget).sum())
    require(n_keep > 0, f"mansu: retain_budget={budget} is below the predicted floor cost of "
                        f"every single entry (cheapest {float(cost.min()):.3g}); raise it")
    keep = torch.zeros_like(cost, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def _restrict(masked: list[MaskedWeight], stats: RetainStatistics, keep: Tensor
              ) -> tuple[list[MaskedWeight], RetainStatistics]:
    if bool(keep.all()):  # the common case: no copy of the gradients
        return masked, stats
    kept, sizes = [], [m.index.numel() for m in masked]
    for m, part in zip(masked, keep.split(sizes)):
        if part.any():
            kept.append(m.subset(part))
    return kept, replace(
        stats, fisher=stats.fisher[keep], mean_gradient=stats.mean_gradient[keep],
        gradients=stats.gradients[:, keep] if stats.gradients is not None else None,
        covariances={m.name: stats.covariances[m.name] for m in kept
                     if m.name in stats.covariances})


Projector = Callable[[Tensor], Tensor]


def _projector(kind: str, masked: list[MaskedWeight], stats: RetainStatistics, energy: float
               ) -> tuple[Projector | None, int]:
    if kind == "fisher":
        nullspace = FisherNullspace(stats.gradients, energy)
        return nullspace, nullspace.rank
    if kind == "activation":
        nullspace = ActivationNullspace(masked, stats.covariances, energy)
        return nullspace, nullspace.rank
    return None, 0


def _top_directions(eigenvalues: Tensor, energy: float) -> int:
    """How many of the (descending) eigenvalues carry ``energy`` of their sum, noise excluded."""
    if eigenvalues.numel() == 0 or eigenvalues[0] <= 0:
        return 0
    cumulative = eigenvalues.cumsum(0)
    needed = int((cumulative < energy * cumulative[-1]).sum()) + 1
    return min(needed, int((eigenvalues > _RANK_TOLERANCE * eigenvalues[0]).sum()))


class FisherNullspace:
    """Δ ↦ Δ − U Uᵀ Δ, U the top right singular vectors of the per-example retain gradients
    G [n, d] that carry ``energy`` of their squared singular values: the null space of the
    circuit-restricted empirical Fisher. U comes from the n × n Gram matrix in float64 (n ≪ d)
    and is written over G's first rows, chunk by chunk (G is consumed: no second n × d tensor).
    The projection is applied twice, which takes the residual along U from fp32 rounding (~1e-7)
    to its square."""

    def __init__(self, gradients: Tensor, energy: float, chunk: int = 1 << 16):
        gram = torch.zeros(gradients.shape[0], gradients.shape[0], dtype=torch.float64,
                           device=gradients.device)
        for start in range(0, gradients.shape[1], chunk):
            block = gradients[:, start:start + chunk].double()
            gram += block @ block.T
        eigenvalues, vectors = torch.linalg.eigh(gram)
        eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
        self.rank = _top_directions(eigenvalues, energy)
        weights = (vectors[:, :self.rank] / eigenvalues[:self.rank].sqrt()).T
        for start in range(0, gradients.shape[1], chunk):
            columns = gradients[:, start:start + chunk]
            columns[:self.rank] = weights @ columns.double()
        self.basis = gradients[:self.rank]

    def __call__(self, delta: Tensor) -> Tensor:
        for _ in range(2):
            delta = delta - self.basis.T @ (self.basis @ delta)
        return delta


class ActivationNullspace:
    """AlphaEdit-style: each weight's update ΔW (on the rows I × columns J holding masked entries)
    becomes ΔW P, P the projector onto the eigenvectors of that layer's retain input covariance
    (columns J) outside those carrying ``energy`` of its trace, so ΔW x ≈ 0 for retain inputs."""

    def __init__(self, masked: list[MaskedWeight], covariances: dict, energy: float):
        self.parts = []
        self.rank = 0
        for m in masked:
            in_features = m.module.in_features
            rows, row_pos = (m.index // in_features).unique(return_inverse=True)
            cols, col_pos = (m.index % in_features).unique(return_inverse=True)
            collected, cov = covariances[m.name]
            where = torch.searchsorted(collected, cols)
            eigenvalues, vectors = torch.linalg.eigh(cov[where][:, where])
            eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
            k = _top_directions(eigenvalues, energy)
            self.rank += k
            self.parts.append((len(rows), len(cols), row_pos, col_pos, vectors[:, :k].float()))

    def __call__(self, delta: Tensor) -> Tensor:
        out = []
        for (n_rows, n_cols, row_pos, col_pos, high), part in zip(
                self.parts, delta.split([len(p[2]) for p in self.parts])):
            block = torch.zeros(n_rows, n_cols, dtype=delta.dtype, device=delta.device)
            block[row_pos, col_pos] = part
            block = block - (block @ high) @ high.T
            out.append(block[row_pos, col_pos])
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Forget losses and the masked optimizer


def logit_margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """mean over scored next tokens of relu(z_y − max_{v≠y} z_v), in fp32: the true token is
    pushed just below the best other token, then left alone."""
    z = logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != -100
    safe = targets.clamp_min(0).unsqueeze(-1)
    true_logit = z.gather(-1, safe).squeeze(-1)
    best_other = z.scatter(-1, safe, float("-inf")).amax(-1)
    margins = torch.relu(true_logit - best_other) * scored
    return margins.sum() / scored.sum()


def _forget_loss(kind: str, model, tokenizer, corpus: Sequence[str], ctx: RunContext, *,
                 beta: float, batch_size: int, max_length: int) -> Callable[[Batch], Tensor]:
    if kind == "ga":
        return lambda batch: ga_loss(mean_nll(model, batch))
    if kind == "logit":
        return lambda batch: logit_margin_loss(forward_logits(model, batch), batch["labels"])
    reference = _reference_logprobs(model, _encode(tokenizer, corpus, max_length), batch_size,
                                    ctx.device)

    def npo(batch: Batch) -> Tensor:
        keys = _row_keys(batch)
        missing = [k for k in keys if k not in reference]
        if missing:
            raise RuntimeError("a forget batch holds a text whose θ0 log-likelihood was not "
                               "precomputed: mansu's tokenisation differs from text_batches'")
        logp_ref = torch.tensor([reference[k] for k in keys], device=batch["input_ids"].device)
        return npo_loss(sequence_logprobs(model, batch), logp_ref, beta)

    return npo


@torch.no_grad()
def _reference_logprobs(model, texts: list[list[int]], batch_size: int, device
                        ) -> dict[tuple[int, ...], float]:
    """log π_θ0(y) of every forget text, keyed by its token ids (NPO's frozen reference)."""
    table = {}
    with _eval_mode(model):
        for start in range(0, len(texts), batch_size):
            batch = {k: v.to(device) for k, v in collate(texts[start:start + batch_size],
                                                         0).items()}
            table.update(zip(_row_keys(batch), sequence_logprobs(model, batch).tolist()))
    return table


def _row_keys(batch: Batch) -> list[tuple[int, ...]]:
    return [tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


class MaskedAdamW:
    """AdamW whose parameters are the masked entries alone, one flat tensor per weight, so each
    moment holds exactly |M| entries. After every AdamW step the step is projected (``project``:
    flat step over all entries -> projected step) and written into the weights. Storage as in
    mansu.training: ``fp32``; ``bf16``, the gathered bf16 values stepped directly (a step below
    half an ulp rounds away); ``bf16_master``, fp32 copies stepped and written back rounded.
    It offers what run_unlearning uses of StorageAdamW: params, zero_grad, backward, step."""

    def __init__(self, masked: Sequence[MaskedWeight], storage: str, *, lr: float,
                 weight_decay: float = 0.0, project: Projector | None = None):
        self.masked = list(masked)
        self.params = [m.param for m in self.masked]
        expected = torch.float32 if storage == "fp32" else torch.bfloat16
        wrong = {p.dtype for p in self.params} - {expected}
        require(not wrong, f"mansu: storage {storage!r} needs {expected} weights, found {wrong}")
        dtype = torch.bfloat16 if storage == "bf16" else torch.float32
        self.values = [m.current().to(dtype).clone() for m in self.masked]
        self.sizes = [v.numel() for v in self.values]
        self.optimizer = torch.optim.AdamW(self.values, lr=lr, weight_decay=weight_decay)
        self.project = project

    def zero_grad(self) -> None:
        for value in self.values:
            value.grad = None

    def backward(self, loss: Tensor) -> None:
        with gathered_gradients(self.masked) as parts:
            loss.backward()
        for value, part in zip(self.values, parts):
            if part is not None:
                part = part.to(value.dtype)
                value.grad = part if value.grad is None else value.grad + part

    @torch.no_grad()
    def step(self, update_masks=None) -> None:
        if update_masks is not None:
            raise ValueError("MaskedAdamW steps the masked entries only; it takes no update_masks")
        before = [value.clone() for value in self.values]
        self.optimizer.step()
        if self.project is not None:
            step = self.project(torch.cat([(v.float() - b.float())
                                           for v, b in zip(self.values, before)]))
            for value, old, part in zip(self.values, before, step.split(self.sizes)):
                value.copy_(old.float() + part)
        for m, value in zip(self.masked, self.values):
            m.write(value)

    def state_entries(self) -> dict[str, int]:
        """Entries per kind of optimizer state, summed over the weights (``step`` counters
        excluded) and of the stepped values themselves."""
        counts = {"values": sum(self.sizes)}
        for state in self.optimizer.state.values():
            for key, tensor in state.items():
                if key != "step":
                    counts[key] = counts.get(key, 0) + tensor.numel()
        return counts


# ---------------------------------------------------------------------------------------------
# The magnitude floor and its certificate


@dataclass
class FloorResult:
    """``values``: the floored entries (dtype of the updated ones); ``floored``: moved onto the
    next code in the update's direction; ``restored``: moved, but put back to θ0."""

    values: Tensor
    floored: Tensor
    restored: Tensor


def floor_entries(theta0: Tensor, updated: Tensor, scale: Tensor, code0: Tensor,
                  absmax_holder: Tensor, generator: torch.Generator | None = None) -> FloorResult:
    """The floor on flat entries: each moved entry goes to the grid value code × scale of the
    nearest code at or beyond where the update left it, at least one code past θ0's, in the
    update's direction; absmax holders and entries with no code in that direction go back to θ0.
    With a ``generator`` (``floor_mode: stochastic``) an entry is floored only with probability
    |Δ| / |floored − θ0| and otherwise put back to θ0, so the floored update equals the trained
    one in expectation instead of growing every step to a whole code."""
    code = NF4_CODE.to(scale.device)
    delta = updated.float() - theta0.float()
    moved = delta != 0
    up = delta > 0
    position = updated.float() / scale.clamp_min(torch.finfo(torch.float32).tiny)
    j0 = code0.long()
    first_at_or_above = torch.searchsorted(code, position).clamp(max=_TOP_CODE)
    last_at_or_below = (torch.searchsorted(code, position, right=True) - 1).clamp(min=0)
    target = torch.where(up, torch.maximum(j0 + 1, first_at_or_above),
                         torch.minimum(j0 - 1, last_at_or_below)).clamp(0, _TOP_CODE)
    reachable = torch.where(up, j0 < _TOP_CODE, j0 > 0)
    floored = moved & reachable & ~absmax_holder
    grid = grid_value(target, scale, updated.dtype)
    if generator is not None:
        keep = delta.abs() / (grid.float() - theta0.float()).abs().clamp_min(delta.abs())
        draw = torch.rand(keep.shape, generator=generator, device=generator.device)
        floored &= draw.to(keep.device) < keep
    restored = moved & ~floored
    values = torch.where(restored, theta0.to(updated.dtype), updated)
    values = torch.where(floored, grid, values)
    return FloorResult(values, floored, restored)


def grid_value(target: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``dtype`` value nearest NF4_CODE[target] × scale (computed in float32, as bitsandbytes
    dequantizes) that bitsandbytes' rounding still maps to ``target`` at this scale: the rounded
    value, or its neighbour on the other side of the exact one if rounding crossed a boundary."""
    exact = NF4_CODE.to(scale.device)[target] * scale
    nearest = exact.to(dtype)
    toward_exact = torch.where(nearest.float() > exact, float("-inf"), float("inf")).to(dtype)
    other = torch.nextafter(nearest, toward_exact)
    return torch.where(_code_at(nearest, scale) == target, nearest, other)


def _code_at(values: Tensor, scale: Tensor) -> Tensor:
    x = torch.clamp(values.float() * (1.0 / scale), -1, 1)
    return torch.bucketize(x, NF4_MIDPOINTS.to(x.device))


def magnitude_floor(theta0: Tensor, updated: Tensor, mask: Tensor, blocksize: int = 64, *,
                    generator: torch.Generator | None = None) -> FloorResult:
    """The floor on a whole weight tensor: ``mask`` (its shape) says which entries may be floored;
    every block-absmax element of θ0 (ties included) is protected even inside the mask. Entries
    outside the mask keep their updated value. ``floored`` / ``restored`` are flat."""
    x, absmax = normalized_blocks(theta0, blocksize)
    scale = expand_blocks(absmax, x.numel(), blocksize)
    flat0, flat = theta0.reshape(-1), updated.reshape(-1)
    entries = mask.reshape(-1).nonzero()[:, 0]
    codes = torch.bucketize(x, NF4_MIDPOINTS.to(x.device))
    holders = flat0.float().abs() == scale
    inner = floor_entries(flat0[entries], flat[entries], scale[entries], codes[entries],
                          holders[entries], generator)
    values = flat.clone()
    values[entries] = inner.values
    floored = torch.zeros_like(flat, dtype=torch.bool)
    restored = torch.zeros_like(floored)
    floored[entries], restored[entries] = inner.floored, inner.restored
    return FloorResult(values.view_as(updated), floored, restored)


def apply_floor(masked: Sequence[MaskedWeight], generator: torch.Generator | None = None
                ) -> dict:
    """Floor every masked weight in place (their block-absmax elements are not in the mask)."""
    floored = restored = 0
    for m in masked:
        result = floor_entries(m.theta0, m.current(), m.scale, m.code0,
                               torch.zeros_like(m.index, dtype=torch.bool), generator)
        m.write(result.values)
        m.index_floored = result.floored
        floored += int(result.floored.sum())
        restored += int(result.restored.sum())
    return {"floored": floored, "restored": restored}


def bnb_nf4(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """bitsandbytes' NF4 of ``weight`` as stored: (code per element, block absmax, dequantized
    values in the weight's dtype), all flat. Codes are packed two per byte, high nibble first.
    The tensor is handed over flattened: the codes do not depend on the shape, but bitsandbytes
    0.50.2's CPU dequantize kernel is wrong for 2-D shapes whose last dimension is not a multiple
    of the blocksize (e.g. 867 of 1024 values of a 32 x 32 weight)."""
    packed, state = bnb_functional.quantize_4bit(weight.detach().reshape(-1).contiguous(),
                                                 blocksize=blocksize, compress_statistics=False,
                                                 quant_type="nf4")
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: weight.numel()]
    return codes, state.absmax, bnb_functional.dequantize_4bit(packed, state).reshape(-1)


def nf4_certificate(masked: Sequence[MaskedWeight], certified: Sequence[Tensor],
                    blocksize: int) -> dict:
    """Quantize θ0 and θu of every masked weight with bitsandbytes and report, over the certified
    entries (the floored ones, or the moved ones without a floor), the share whose NF4 code
    differs from Q(θ0)'s and the share that are exact fixed points of Q in the stored dtype, plus
    how many blocks changed scale (the floor never changes one)."""
    n = flipped = fixed = rescaled = 0
    for m, chosen in zip(masked, certified):
        after = m.param.detach()
        before = after.clone()
        before.view(-1)[m.index] = m.theta0
        codes0, absmax0, _ = bnb_nf4(before, blocksize)
        codes, absmax, dequantized = bnb_nf4(after, blocksize)
        positions = m.index[chosen]
        n += positions.numel()
        flipped += int((codes[positions] != codes0[positions]).sum())
        fixed += int((dequantized[positions] == after.reshape(-1)[positions]).sum())
        rescaled += int((absmax != absmax0).sum())
    return {"entries": n, "code_flip_share": flipped / n if n else None,
            "fixed_point_share": fixed / n if n else None, "blocks_rescaled": rescaled}


def _flag_failed_certificate(certificate: dict) -> None:
    """Say it in the record and the log when a floored weight kept its code or a block changed
    scale: the floor's guarantee did not hold for this run."""
    if certificate["entries"] and (certificate["code_flip_share"] < 1.0
                                   or certificate["blocks_rescaled"]):
        message = (f"NF4 CERTIFICATE FAILED: only {certificate['code_flip_share']:.6f} of the "
                   f"{certificate['entries']} floored weights changed their bitsandbytes code "
                   f"and {certificate['blocks_rescaled']} blocks changed scale; quantization may "
                   "undo part of this unlearning")
        certificate["warning"] = message
        log.error(message)


def _log_summary(info: dict) -> None:
    floor, loss = info["floor"], info["retain_loss"]
    log.info("mansu: %d masked entries (%.4f%% of parameters), null-space rank %d, %d moved by "
             "training, %s floored, NF4 code flips %s; retain NLL %+.4g measured vs %+.4g "
             "predicted (floor bound %.4g)",
             info["trained_parameters"], 100 * info["mask"]["share_of_parameters"],
             info["nullspace"]["rank"], floor["moved_by_training"], floor.get("floored", "none"),
             info["certificate"]["code_flip_share"], loss["measured_increase"],
             loss["predicted_increase"], loss["predicted_floor_cost"])


# ---------------------------------------------------------------------------------------------
# Small helpers


def _sample(texts: Sequence[str], n: int, seed: int) -> list[str]:
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    return [texts[i] for i in order[:n].tolist()]


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    # The rule text_batches applies, so that a batch's rows are found in the NPO reference table.
    return [ids[:max_length] for ids in tokenizer(list(texts))["input_ids"] if len(ids) > 1]


def _as_batch(ids: list[int], device) -> Batch:
    return {k: v.to(device) for k, v in collate([ids], 0).items()}


@torch.no_grad()
def _mean_text_nll(model, texts: Sequence[list[int]], device) -> float:
    with _eval_mode(model):
        return sum(float(mean_nll(model, _as_batch(ids, device))) for ids in texts) / len(texts)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
