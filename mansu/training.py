"""What every unlearning method shares: the result type, text batches, log-likelihoods, an AdamW
that honours the run's parameter storage, a frozen reference copy, and the step loop with its
divergence check and optional forget-accuracy stop.

Parameter storage (``ctx.storage``, METHOD.md "What measurements ... found"):
- ``fp32``: fp32 weights stepped by a plain AdamW (the control).
- ``bf16``: the bf16 weights are stepped directly, with no fp32 master copy, as reference code that
  loads a model in bf16 does. An Adam step below half a bf16 ulp of a weight rounds away, which is
  what decides whether NF4 later reverses the unlearning; do not "fix" it here.
- ``bf16_master``: the optimizer steps an fp32 master copy; after each step the bf16 weights are
  set to the master rounded to bf16, so small steps accumulate until they cross an ulp.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from mansu.context import RunContext
from mansu.data import Split
from mansu.evaluation import evaluate_mcq
from mansu.losses import kl_retain

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels (-100 where not scored)
UpdateMasks = Sequence[torch.Tensor | None]  # per parameter: True where the update is kept


@dataclass
class UnlearnResult:
    """The unlearned model plus what the method wants recorded (``info`` is JSON-ready)."""

    model: nn.Module
    steps: int
    losses: list[float]
    info: dict = field(default_factory=dict)


class UnlearningDiverged(RuntimeError):
    """A loss or a trained parameter became NaN/inf; the message names the step and the value."""

    status = "diverged"  # what the run's record says instead of "failed"


def require(condition: bool, message: str) -> None:
    """Reject an impossible setting before any training, with one clear message."""
    if not condition:
        raise ValueError(message)


def check_common_knobs(method: str, forget: Split, *, lr: float, max_steps: int, batch_size: int,
                       stop_forget_acc: float | None, eval_every: int) -> None:
    """The checks every training method needs, run before any parameter changes."""
    require(len(forget.corpus) > 0, f"{method}: the forget corpus is empty; nothing to unlearn")
    require(lr > 0, f"{method}: lr must be > 0, got {lr}")
    require(max_steps >= 1, f"{method}: max_steps must be >= 1, got {max_steps}")
    require(batch_size >= 1, f"{method}: batch_size must be >= 1, got {batch_size}")
    if stop_forget_acc is not None:
        require(0.0 <= stop_forget_acc <= 1.0,
                f"{method}: stop_forget_acc must be in [0, 1], got {stop_forget_acc}")
        require(eval_every >= 1, f"{method}: eval_every must be >= 1, got {eval_every}")
        require(len(forget.questions) > 0,
                f"{method}: stop_forget_acc needs forget questions to evaluate, and there are none")


# ---------------------------------------------------------------------------------------------
# Text batches and log-likelihoods


LOSS_TOKENS = ("answer", "all")


@dataclass(frozen=True)
class Encoded:
    """One training text: its token ids and the first position whose token is scored (1 = every
    next token; later when only the answer is)."""

    ids: tuple[int, ...]
    first_scored: int = 1


def encode_texts(tokenizer, texts: Sequence[str], *, answer_starts: Sequence[int] | None = None,
                 max_length: int = 512) -> list[Encoded]:
    """Tokenize ``texts`` (truncated to ``max_length`` tokens). With ``answer_starts`` (the
    character each answer begins at) only tokens that end past it are scored: the answer, not
    the question or shared prefix. A text with nothing left to score (fewer than two tokens, or
    an answer cut off by truncation) is left out."""
    if answer_starts is None:
        rows = tokenizer(list(texts))["input_ids"]
        return [Encoded(tuple(ids[:max_length])) for ids in rows if len(ids) > 1]
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("loss_tokens=answer needs a fast tokenizer (character offsets); "
                         "use loss_tokens=all")
    batch = tokenizer(list(texts), return_offsets_mapping=True)
    encoded = []
    for ids, offsets, start in zip(batch["input_ids"], batch["offset_mapping"], answer_starts):
        ids = ids[:max_length]
        first = next((i for i, (_, end) in enumerate(offsets[:len(ids)]) if end > start), None)
        if first is not None and len(ids) > 1:
            encoded.append(Encoded(tuple(ids), max(first, 1)))
    return encoded


def scored_answer_starts(split: Split, loss_tokens: str) -> list[int] | None:
    """What ``encode_texts`` needs for a method's ``loss_tokens``: the split's answer starts for
    ``answer`` (None for a raw-text corpus, whose every token is answer), None for ``all``."""
    require(loss_tokens in LOSS_TOKENS,
            f"loss_tokens must be one of {LOSS_TOKENS}, got {loss_tokens!r}")
    return split.answer_starts if loss_tokens == "answer" else None


def text_batches(tokenizer, texts: Sequence[str], *, batch_size: int, seed: int, device,
                 max_length: int = 512, answer_starts: Sequence[int] | None = None
                 ) -> Iterator[Batch]:
    """Endless batches of `texts`: each pass over the corpus is a fresh seeded permutation, cut
    into batches of `batch_size` (the last one of a pass may be smaller). Texts are tokenized
    once (``encode_texts``: truncated, answer-only labels when ``answer_starts`` is given),
    right-padded to the longest text of the batch."""
    encoded = encode_texts(tokenizer, texts, answer_starts=answer_starts, max_length=max_length)
    return encoded_batches(encoded, batch_size=batch_size, seed=seed, device=device,
                           pad_id=_pad_id(tokenizer))


def encoded_batches(encoded: Sequence[Encoded], *, batch_size: int, seed: int, device,
                    pad_id: int = 0) -> Iterator[Batch]:
    """``text_batches`` of texts already encoded."""
    if not encoded:
        raise ValueError("no text with a token to score to make batches from")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield {k: v.to(device) for k, v in collate_encoded(
                [encoded[i] for i in order[start:start + batch_size]], pad_id).items()}


def split_batches(tokenizer, split: Split, *, loss_tokens: str, batch_size: int, seed: int,
                  device, max_length: int = 512) -> Iterator[Batch]:
    """``text_batches`` of a split's corpus, scoring what ``loss_tokens`` says."""
    return text_batches(tokenizer, split.corpus, batch_size=batch_size, seed=seed, device=device,
                        max_length=max_length,
                        answer_starts=scored_answer_starts(split, loss_tokens))


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Right-pad token lists into a batch; padding is masked out of attention and labels."""
    return collate_encoded([Encoded(tuple(s)) for s in sequences], pad_id)


def collate_encoded(rows: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad encoded texts into a batch; padding and each text's unscored prefix are masked
    out of the labels (-100), padding out of attention (labels are shifted by the loss)."""
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, r in enumerate(rows):
        ids = torch.tensor(r.ids, dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = ids
        if r.first_scored > 1:  # position 0 is never a target: no mask needed for it
            labels[row, :r.first_scored] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_id(tokenizer) -> int:
    # Llama-style tokenizers have no pad token; the id is irrelevant since padding is masked.
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def _token_nll(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of each next token [B, T-1] (0 where unscored) and the scored mask.
    Logits are upcast to fp32 as Hugging Face's own causal-LM loss does."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                      ignore_index=-100, reduction="none")
    return nll, targets != -100


def sequence_logprobs(model, batch: Batch) -> torch.Tensor:
    """[B] log π(y) of each sequence: its token log-probs summed (NPO's sequence likelihood)."""
    nll, _ = _token_nll(model, batch)
    return -nll.sum(dim=1)


def scored_token_counts(batch: Batch) -> torch.Tensor:
    """[B] how many tokens of each sequence are scored (|y|, SimNPO's length normalisation)."""
    return (batch["labels"][:, 1:] != -100).sum(dim=1)


def mean_nll(model, batch: Batch) -> torch.Tensor:
    """Mean NLL over all scored tokens of the batch (= Hugging Face's ``outputs.loss``)."""
    nll, scored = _token_nll(model, batch)
    return nll.sum() / scored.sum()


def forward_logits(model, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def retain_term(kind: str, model, batch: Batch, reference: nn.Module | None = None
                ) -> torch.Tensor:
    """The retain regulariser the references offer: ``nll`` = NLL(retain) (TOFU's grad_diff),
    ``kl`` = KL(π_ref ‖ π_θ) over the retain tokens (TOFU's KL; needs the frozen reference)."""
    if kind == "nll":
        return mean_nll(model, batch)
    if kind == "kl":
        with torch.no_grad():
            ref_logits = forward_logits(reference, batch)
        return kl_retain(ref_logits, forward_logits(model, batch), batch["attention_mask"])
    raise ValueError(f"unknown retain loss {kind!r}; expected 'nll' or 'kl'")


# ---------------------------------------------------------------------------------------------
# Parameters, optimizer, reference model


def trainable_parameters(model: nn.Module, *, train_embeddings: bool = True
                         ) -> list[tuple[str, nn.Parameter]]:
    """Every parameter that requires grad (tied weights once). With train_embeddings=False the
    input embedding and output projection (lm_head) matrices are left out."""
    excluded: set[int] = set()
    if not train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                excluded.add(id(module.weight))
    return [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in excluded]


# The run's `optimizer` config key. The launcher sets it around the method call
# (mansu.distributed.unlearn_with_memory_options), so every method's StorageAdamW follows it
# without each method passing it along.
OPTIMIZER_KIND: ContextVar[str] = ContextVar("mansu_optimizer_kind", default="adamw")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw")


def make_adamw(kind: str, params: Sequence[torch.Tensor], **kwargs) -> torch.optim.Optimizer:
    """torch's AdamW, or bitsandbytes' 8-bit (moments as blockwise-quantized uint8) and paged
    (state in CUDA unified memory, evicted to the host under pressure) variants."""
    if kind == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    import bitsandbytes as bnb

    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw": bnb.optim.PagedAdamW}
    return classes[kind](params, **kwargs)


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether the parameters are FSDP2 shards (DTensors), see mansu.distributed."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


class StorageAdamW:
    """AdamW over `params`, stepping them the way `storage` says (see the module docstring);
    `kind` (default: the run's `optimizer` key) picks torch's AdamW or a bitsandbytes one.

    ``step(update_masks)`` keeps the update only where a mask is True: the gradient is zeroed
    elsewhere *and* the stepped tensor is restored there after the step, so neither weight decay
    nor Adam's momentum moves an unselected weight.
    """

    def __init__(self, params: Sequence[nn.Parameter], storage: str, *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, kind: str | None = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters to optimize")
        expected = torch.float32 if storage == "fp32" else torch.bfloat16
        wrong = {p.dtype for p in self.params} - {expected}
        if wrong:
            raise ValueError(f"storage {storage!r} needs {expected} parameters, found {wrong}; "
                             "cast the model to ctx.param_dtype first")
        self.storage = storage
        # The tensors AdamW actually updates: the parameters, or their fp32 masters.
        self.stepped = ([p.detach().float().clone() for p in self.params]
                        if storage == "bf16_master" else self.params)
        self.kind = kind or OPTIMIZER_KIND.get()
        self.sharded = is_sharded(self.params)
        self.optimizer = make_adamw(self.kind, self.stepped, lr=lr, betas=betas, eps=eps,
                                    weight_decay=weight_decay)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Add d loss/d p to p.grad for the optimized parameters only: the rest of the model
        gets no gradient computed and no stray .grad left behind. FSDP-sharded parameters need
        loss.backward(): FSDP reduce-scatters the gradients into their shards in its hooks."""
        if self.sharded:
            loss.backward()
            return
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for p, g in zip(self.params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    @torch.no_grad()
    def step(self, update_masks: UpdateMasks | None = None) -> None:
        if self.storage == "bf16_master":
            for master, p in zip(self.stepped, self.params):
                master.grad = None if p.grad is None else p.grad.float()
        masks = list(update_masks) if update_masks is not None else [None] * len(self.params)
        if len(masks) != len(self.params):
            raise ValueError(f"{len(masks)} update masks for {len(self.params)} parameters")
        before = {}
        for i, (tensor, mask) in enumerate(zip(self.stepped, masks)):
            if mask is not None:
                before[i] = tensor.detach().clone()
                if tensor.grad is not None:  # out of place: autograd may hand back a view
                    tensor.grad = tensor.grad * mask
        self.optimizer.step()
        for i, old in before.items():
            self.stepped[i].copy_(torch.where(masks[i], self.stepped[i], old))
        if self.storage == "bf16_master":
            for master, p in zip(self.stepped, self.params):
                p.copy_(master)  # round to nearest bf16


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference copy of θ0 for NPO/KL/RMU: eval mode, no grads; call it under no_grad.
    An FSDP-sharded model gets a reference sharded the same way (FSDP forbids deepcopy)."""
    if is_sharded(list(model.parameters())):
        from mansu.distributed import sharded_frozen_copy

        return sharded_frozen_copy(model)
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


# ---------------------------------------------------------------------------------------------
# The step loop


def run_unlearning(model: nn.Module, tokenizer, forget: Split, ctx: RunContext,
                   optimizer: StorageAdamW, closure: Callable[[], torch.Tensor], *,
                   max_steps: int, stop_forget_acc: float | None = None, eval_every: int = 10,
                   update_masks: Callable[[], UpdateMasks] | None = None,
                   info: dict | None = None) -> UnlearnResult:
    """Run up to `max_steps` optimizer steps. Each step calls `closure`, which computes the loss,
    backpropagates it (``optimizer.backward``) and returns it; `update_masks`, called after the
    closure, restricts the update. A non-finite loss raises UnlearningDiverged before the step,
    a non-finite trained parameter right after it.
    With `stop_forget_acc`, forget accuracy (ctx.scoring) is measured every `eval_every` steps
    and training stops once it is <= stop_forget_acc."""
    was_training = model.training
    model.train()
    losses: list[float] = []
    forget_acc_trace: list[list[float]] = []
    stopped_early = False
    try:
        for step in range(1, max_steps + 1):
            optimizer.zero_grad()
            loss = float(closure())
            if not math.isfinite(loss):
                raise UnlearningDiverged(f"loss became {loss} at step {step}")
            optimizer.step(update_masks() if update_masks is not None else None)
            _check_finite_parameters(model, optimizer.params, step)
            losses.append(loss)
            if stop_forget_acc is not None and step % eval_every == 0:
                accuracy = _forget_accuracy(model, tokenizer, forget, ctx)
                forget_acc_trace.append([step, accuracy])
                if accuracy <= stop_forget_acc:
                    stopped_early = step < max_steps
                    break
    finally:
        optimizer.zero_grad()
        model.train(was_training)
    record = {"storage": ctx.storage, "stopped_early": stopped_early,
              "trained_tensors": len(optimizer.params),
              "trained_parameters": sum(p.numel() for p in optimizer.params)}
    if stop_forget_acc is not None:
        record["forget_acc_trace"] = forget_acc_trace
    return UnlearnResult(model=model, steps=len(losses), losses=losses,
                         info={**record, **(info or {})})


def _check_finite_parameters(model: nn.Module, params: Sequence[nn.Parameter], step: int) -> None:
    finite = torch.stack([torch.isfinite(p).all() for p in params])
    if not bool(finite.all()):
        bad = params[int((~finite).nonzero()[0])]
        name = next((n for n, p in model.named_parameters() if p is bad), "?")
        raise UnlearningDiverged(f"parameter {name} became NaN/inf at step {step}")


def _forget_accuracy(model, tokenizer, forget: Split, ctx: RunContext) -> float:
    model.eval()
    result = evaluate_mcq(model, tokenizer, forget.questions, scoring=ctx.scoring,
                          bootstrap_iters=1, seed=ctx.seed)  # the interval is unused
    model.train()
    return result.accuracy
