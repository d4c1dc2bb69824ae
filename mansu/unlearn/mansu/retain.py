"""What MANSU knows about the retain set (docs/method.md §4.2-4.3, as changed by measurement).

The retain texts are cut into three disjoint, seeded sets, so that no quantity is checked on the
texts that shaped it (in a run, the null space from the retain train part, the other two from the
fit part; the scored part is never among them):
- ``nullspace`` texts give the per-example gradients whose span the forget step is projected off
  (and, for ``nullspace: activation``, each layer's input covariance);
- ``fisher`` texts give the retain-cost model: the diagonal Fisher F and mean gradient ḡ of the
  per-token retain loss, and the loss the ``measured`` budget checks;
- ``heldout`` texts only measure the retain-loss change, beside the prediction, in the record.

The retain loss is the mean NLL per scored token (answer tokens with ``loss_tokens: answer``).
docs/method.md's F (``fisher: empirical_text``: the square of each text's *mean-token* gradient,
averaged over texts) is kept as an option; measured on the tiny model it is 250-600× smaller than
per-token curvature, so a budget on it never binds. The default ``fisher: sampled`` is the true
Fisher per token: labels sampled from the model at every scored position, the text's summed
gradient squared (cross-position terms vanish in expectation), divided by the token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mansu.attribution.nodes import eval_mode
from mansu.data import Split
from mansu.unlearn.batches import Encoded, collate_encoded, encode_texts, scored_answer_starts
from mansu.unlearn.checks import require
from mansu.unlearn.mansu.mask import MaskedWeight, gathered_gradients, masked_gradient

FISHERS = ("sampled", "empirical_text")


@dataclass
class RetainTexts:
    nullspace: list[Encoded]
    fisher: list[Encoded]
    heldout: list[Encoded]

    def sizes(self) -> dict[str, int]:
        return {"nullspace": len(self.nullspace), "fisher": len(self.fisher),
                "heldout": len(self.heldout)}


def retain_texts(tokenizer, retain: Split, *, loss_tokens: str, n_nullspace: int, n_fisher: int,
                 n_heldout: int, seed: int, max_length: int, fit: Split | None = None
                 ) -> RetainTexts:
    """Three disjoint seeded sets of encoded retain texts of the wanted sizes. With ``fit`` (the
    run's retain fit part) the null-space texts come from ``retain`` (the train part, the only one
    a step may train on) and the Fisher and held-out texts from ``fit``; without it all three are
    cut from ``retain``. A corpus too small for its sets is shared out in the same proportions,
    at least one text each."""
    def encoded(split: Split) -> list[Encoded]:
        return encode_texts(tokenizer, split.corpus, max_length=max_length,
                            answer_starts=scored_answer_starts(split, loss_tokens))

    if fit is None:
        texts = encoded(retain)
        require(len(texts) >= 3, f"mansu: the retain corpus has {len(texts)} usable texts; the "
                                 "null space, the retain-cost model and the held-out check need "
                                 "three disjoint sets, so at least 3")
        return RetainTexts(*_shares(texts, [n_nullspace, n_fisher, n_heldout], seed))
    train, fitted = encoded(retain), encoded(fit)
    require(len(train) >= 1, "mansu: the retain train part has no usable text for the null space")
    require(len(fitted) >= 2, f"mansu: the retain fit part has {len(fitted)} usable texts; the "
                              "retain-cost model and the held-out check need two disjoint sets")
    (nullspace,) = _shares(train, [n_nullspace], seed)
    fisher, heldout = _shares(fitted, [n_fisher, n_heldout], seed)
    return RetainTexts(nullspace, fisher, heldout)


def _shares(encoded: list[Encoded], wanted: list[int], seed: int) -> list[list[Encoded]]:
    if sum(wanted) > len(encoded):
        shares = [max(1, len(encoded) * n // sum(wanted)) for n in wanted]
        shares[0] = len(encoded) - sum(shares[1:])
        wanted = shares
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    cuts = [0]
    for n in wanted:
        cuts.append(cuts[-1] + n)
    return [[encoded[i] for i in order[a:b]] for a, b in zip(cuts, cuts[1:])]


def token_nll_sum(model, batch: dict[str, Tensor], labels: Tensor | None = None
                  ) -> tuple[Tensor, int]:
    """(summed NLL of the scored next tokens, their count); ``labels`` replaces the batch's."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = (batch["labels"] if labels is None else labels)[:, 1:]
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                      ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


@torch.no_grad()
def mean_token_nll(model, texts: Sequence[Encoded], device, pad_id: int = 0,
                   batch_size: int = 16) -> float:
    """Mean NLL per scored token over ``texts`` (the retain loss every budget speaks of)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            batch = _to(collate_encoded(texts[start:start + batch_size], pad_id), device)
            nll, n = token_nll_sum(model, batch)
            total, count = total + float(nll), count + n
    return total / count


@dataclass
class RetainCost:
    """On the masked entries (flat, mask order): ``fisher`` F per token, ``gradient`` ḡ of the
    mean-token loss; ``nll`` that loss at θ0 on the same texts; ``kind`` which F."""

    fisher: Tensor
    gradient: Tensor
    nll: float
    kind: str

    def curvature(self, delta: Tensor) -> Tensor:
        """Per entry: ½ F_i δ_i², the cost the budget ranks and sums."""
        return 0.5 * self.fisher * delta.square()

    def first_order(self, delta: Tensor) -> Tensor:
        """Per entry: ḡ_i δ_i, recorded beside the curvature but not ranked on: estimated on a
        few dozen texts it is mostly noise, and ranking on it picks the entries whose noise
        happens to be negative (measured on SmolLM2's dev half: −4.5 nats predicted, +0.45 held
        out)."""
        return self.gradient * delta


def retain_cost(model, texts: Sequence[Encoded], masked: Sequence[MaskedWeight], device, *,
                kind: str = "sampled", seed: int = 0) -> RetainCost:
    """One forward and two backward passes per text (sampled labels for F, true labels for ḡ)."""
    require(kind in FISHERS, f"mansu: fisher must be one of {FISHERS}, got {kind!r}")
    n_entries = sum(m.index.numel() for m in masked)
    fisher = torch.zeros(n_entries, device=masked[0].index.device)
    gradient = torch.zeros_like(fisher)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total_nll, tokens = 0.0, 0
    with eval_mode(model):
        for encoded in texts:
            batch = _to(collate_encoded([encoded], 0), device)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            scored = targets != -100
            n = int(scored.sum())
            log_probs = logits.log_softmax(-1)
            true_nll = -log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            true_sum = (true_nll * scored).sum()
            if kind == "sampled":
                probs = log_probs.detach().exp()[scored].cpu()
                sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                sampled_nll = -log_probs[scored].gather(-1, sampled.to(device).unsqueeze(-1)).sum()
                with gathered_gradients(masked) as parts:
                    sampled_nll.backward(retain_graph=True)
                g = _cat(parts, masked)
                fisher += g.square()
            else:
                with gathered_gradients(masked) as parts:
                    (true_sum / n).backward(retain_graph=True)
                fisher += _cat(parts, masked).square()
            gradient += masked_gradient(masked, true_sum)
            total_nll, tokens = total_nll + float(true_sum.detach()), tokens + n
    fisher = fisher / (len(texts) if kind == "empirical_text" else tokens)
    return RetainCost(fisher=fisher, gradient=gradient / tokens, nll=total_nll / tokens, kind=kind)


@dataclass
class NullspaceStatistics:
    """Over the null-space texts, on the masked entries: ``gradients`` [n, |M|] each text's
    mean-token NLL gradient (fisher null space only); ``covariances`` weight name -> (masked
    columns, Σ x_J x_Jᵀ of that layer's inputs) for the activation null space."""

    gradients: Tensor | None
    covariances: dict[str, tuple[Tensor, Tensor]]


def nullspace_statistics(model: nn.Module, texts: Sequence[Encoded],
                         masked: Sequence[MaskedWeight], device, *, keep_gradients: bool,
                         covariances: bool, max_gradient_bytes: int) -> NullspaceStatistics:
    """One forward-backward per text (batch of one: no padding enters the covariances). The
    per-example gradients are n × |M| floats: refused up front when over ``max_gradient_bytes``,
    so memory scales with the circuit and a too-large mask fails in a second, not after minutes."""
    n_entries = sum(m.index.numel() for m in masked)
    if keep_gradients:
        needed = len(texts) * n_entries * 4
        require(needed <= max_gradient_bytes,
                f"mansu: the fisher null space needs {len(texts)} x {n_entries:,} per-example "
                f"gradients ({needed / 2**30:.1f} GiB > max_gradient_bytes "
                f"{max_gradient_bytes / 2**30:.1f} GiB); select a smaller circuit "
                "(attribution.select=necessity, attribution.share_of_parameters) or lower "
                "method.n_retain")
    device_of = masked[0].index.device
    gradients = (torch.zeros(len(texts), n_entries, device=device_of) if keep_gradients
                 else None)
    sums = {m.name: _masked_columns(m) for m in masked} if covariances else {}
    covs = {name: torch.zeros(len(cols), len(cols), dtype=torch.float64, device=cols.device)
            for name, cols in sums.items()}
    with eval_mode(model), _input_covariances(masked, sums, covs):
        for row, encoded in enumerate(texts):
            batch = _to(collate_encoded([encoded], 0), device)
            nll, n = token_nll_sum(model, batch)
            g = masked_gradient(masked, nll / n)
            if gradients is not None:
                gradients[row] = g
    return NullspaceStatistics(gradients=gradients,
                               covariances={k: (sums[k], covs[k]) for k in covs})


def _cat(parts: list[Tensor | None], masked: Sequence[MaskedWeight]) -> Tensor:
    return torch.cat([p.float() if p is not None
                      else torch.zeros(m.index.numel(), device=m.index.device)
                      for p, m in zip(parts, masked)])


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


def _to(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
