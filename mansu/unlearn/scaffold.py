"""The training scaffold every gradient baseline shares, written once: the nine knobs they all take
and their checks, the trained parameters and the optimizer, the seeded forget and retain batches,
and the step loop. A baseline is then its own knobs, their checks and its loss (docs/adding_a_method.md):

    @baseline("ga")
    def unlearn(training: Training) -> UnlearnResult:
        return training.train(lambda forget, retain: ga_loss(mean_nll(training.model, forget)))

``baseline`` turns that into the function a config's ``_target_`` names, with the full signature
mansu.config checks the config against (the signature is the schema):
``unlearn(model, tokenizer, forget, retain, ctx, *, <its own knobs>, <the shared Knobs>)``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mansu.context import RunContext
from mansu.data import Split
from mansu.unlearn.batches import Batch, split_batches
from mansu.unlearn.checks import UnlearnResult, check_common_knobs
from mansu.unlearn.loop import run_unlearning
from mansu.unlearn.optimizers import StorageAdamW, UpdateMasks, trainable_parameters


@dataclass(frozen=True)
class Knobs:
    """The knobs every trained baseline takes, with the TOFU/NPO reference's defaults (AdamW at a
    constant lr, counted in steps); ``baseline(...)`` changes a default or leaves a knob out."""

    lr: float = 1e-5                      # AdamW learning rate, constant
    max_steps: int = 100                  # optimizer steps
    batch_size: int = 4                   # texts per batch, forget and retain alike
    weight_decay: float = 0.01            # AdamW weight decay
    max_length: int = 512                 # tokens per text; longer texts are truncated
    loss_tokens: Literal["answer", "all"] = "answer"  # score the answer tokens only, or all
    train_embeddings: bool = True         # false: leave the input embeddings and lm_head alone
    stop_forget_acc: float | None = None  # stop once forget accuracy <= this ...
    eval_every: int = 10                  # ... checked every eval_every steps


KNOB_HINTS = typing.get_type_hints(Knobs)

# A baseline's loss on one step: (forget batch, retain batch or None) -> the scalar to minimise.
Loss = Callable[[Batch, Batch | None], torch.Tensor]

# What every baseline is called with, before its knobs (mansu.run, through hydra's _partial_).
STAGE_INPUTS = [
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("tokenizer", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("forget", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Split),
    inspect.Parameter("retain", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Split),
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=RunContext),
]


@dataclass(frozen=True)
class Training:
    """One baseline's run: the stage's inputs, the shared knobs, and the steps every baseline takes
    the same way. ``train`` is the whole scaffold for a loss; a method that needs more (its own
    parameters or batches, several backward passes) builds on ``optimizer``, ``forget_batches``,
    ``retain_batches`` and ``run``."""

    method: str          # the name its error messages start with
    model: nn.Module
    tokenizer: Any
    forget: Split
    retain: Split
    ctx: RunContext
    knobs: Knobs
    knob_names: frozenset[str]  # the shared knobs this method takes (rmu: no loss_tokens, ...)

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter, in model order (``train_embeddings`` says about the
        embeddings and lm_head)."""
        return [p for _, p in trainable_parameters(self.model,
                                                   train_embeddings=self.knobs.train_embeddings)]

    def optimizer(self, params: Sequence[nn.Parameter]) -> StorageAdamW:
        return StorageAdamW(params, self.ctx.storage, lr=self.knobs.lr,
                            weight_decay=self.knobs.weight_decay)

    def batches(self, split: Split, seed: int) -> Iterator[Batch]:
        knobs = self.knobs
        return split_batches(self.tokenizer, split, loss_tokens=knobs.loss_tokens,
                             batch_size=knobs.batch_size, seed=seed, device=self.ctx.device,
                             max_length=knobs.max_length)

    def forget_batches(self) -> Iterator[Batch]:
        """Endless seeded forget batches (seed ctx.seed)."""
        return self.batches(self.forget, self.ctx.seed)

    def retain_batches(self) -> Iterator[Batch]:
        """Endless seeded retain batches (seed ctx.seed + 1, another order than the forget's)."""
        return self.batches(self.retain, self.ctx.seed + 1)

    def run(self, optimizer: StorageAdamW, closure: Callable[[], torch.Tensor], *,
            info: dict | None = None,
            update_masks: Callable[[], UpdateMasks] | None = None) -> UnlearnResult:
        """mansu.unlearn.loop.run_unlearning with the shared knobs; the record gets `info`, then
        ``loss_tokens`` where the method takes that knob."""
        knobs = self.knobs
        recorded = dict(info or {})
        if "loss_tokens" in self.knob_names:
            recorded["loss_tokens"] = knobs.loss_tokens
        return run_unlearning(self.model, self.tokenizer, self.forget, self.ctx, optimizer,
                              closure, max_steps=knobs.max_steps,
                              stop_forget_acc=knobs.stop_forget_acc, eval_every=knobs.eval_every,
                              update_masks=update_masks, info=recorded)

    def train(self, loss: Loss, *, retain: bool = False,
              params: Sequence[nn.Parameter] | None = None, info: dict | None = None
              ) -> UnlearnResult:
        """Minimise `loss` over `params` (default: ``parameters()``): each step draws a forget
        batch and, with `retain`, a retain batch, and backpropagates loss(forget, retain or None)."""
        optimizer = self.optimizer(self.parameters() if params is None else params)
        forget_batches = self.forget_batches()
        retain_batches = self.retain_batches() if retain else None

        def closure():
            value = loss(next(forget_batches),
                         next(retain_batches) if retain_batches is not None else None)
            optimizer.backward(value)
            return value.detach()

        return self.run(optimizer, closure, info=info)


def baseline(method: str, *, without: Collection[str] = (), **defaults: Any
             ) -> Callable[[Callable[..., UnlearnResult]], Callable[..., UnlearnResult]]:
    """Decorate ``fn(training: Training, *, <own knobs>) -> UnlearnResult`` into the baseline
    ``unlearn(model, tokenizer, forget, retain, ctx, *, <own knobs>, <shared knobs>)``.

    `defaults` changes a shared knob's default for this method (``lr=5e-5``); `without` leaves
    shared knobs out of its signature (their Knobs default is then used and not recorded).
    The call checks the shared knobs (check_common_knobs, before anything else) and calls `fn`."""
    unknown = (set(defaults) | set(without)) - set(KNOB_HINTS)
    if unknown:
        raise TypeError(f"baseline({method!r}): no shared knob {sorted(unknown)}; "
                        f"the shared knobs are {', '.join(KNOB_HINTS)}")
    if set(defaults) & set(without):
        raise TypeError(f"baseline({method!r}): {sorted(set(defaults) & set(without))} "
                        "both given a default and left out")
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                default=defaults.get(f.name, f.default),
                                annotation=KNOB_HINTS[f.name])
              for f in dataclasses.fields(Knobs) if f.name not in without]
    shared_names = frozenset(p.name for p in shared)

    def wrap(fn: Callable[..., UnlearnResult]) -> Callable[..., UnlearnResult]:
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, inspect.Parameter.empty))
               for p in inspect.signature(fn).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
        clash = {p.name for p in own} & set(KNOB_HINTS)
        if clash:
            raise TypeError(f"baseline({method!r}): {sorted(clash)} are shared knobs; change "
                            "their default with baseline(..., name=value) instead")
        taken = {p.name for p in own} & {p.name for p in STAGE_INPUTS}
        if taken:
            raise TypeError(f"baseline({method!r}): {sorted(taken)} name the stage's inputs; "
                            "give the knob another name")
        signature = inspect.Signature([*STAGE_INPUTS, *own, *shared],
                                      return_annotation=UnlearnResult)

        @functools.wraps(fn)
        def unlearn(*args, **kwargs) -> UnlearnResult:
            values = signature.bind(*args, **kwargs)
            values.apply_defaults()
            given = values.arguments
            knobs = Knobs(**{name: given[name] for name in shared_names})
            check_common_knobs(method, given["forget"], lr=knobs.lr, max_steps=knobs.max_steps,
                               batch_size=knobs.batch_size,
                               stop_forget_acc=knobs.stop_forget_acc,
                               eval_every=knobs.eval_every)
            training = Training(method, given["model"], given["tokenizer"], given["forget"],
                                given["retain"], given["ctx"], knobs, shared_names)
            return fn(training, **{p.name: given[p.name] for p in own})

        # What mansu.config reads: inspect.signature and typing.get_type_hints of the target.
        unlearn.__signature__ = signature
        unlearn.__annotations__ = {
            **{p.name: p.annotation for p in signature.parameters.values()
               if p.annotation is not inspect.Parameter.empty},
            "return": UnlearnResult}
        return unlearn

    return wrap
