"""The parameters a method trains and the AdamW that honours the run's parameter storage.

Parameter storage (``ctx.storage``, docs/method.md "What measurements ... found"):
- ``fp32``: fp32 weights stepped by a plain AdamW (the control).
- ``bf16``: the bf16 weights are stepped directly, with no fp32 master copy, as reference code that
  loads a model in bf16 does. An Adam step below half a bf16 ulp of a weight rounds away, which is
  what decides whether NF4 later reverses the unlearning; do not "fix" it here.
- ``bf16_master``: the optimizer steps an fp32 master copy; after each step the bf16 weights are
  set to the master rounded to bf16, so small steps accumulate until they cross an ulp.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar

import torch
from torch import nn

UpdateMasks = Sequence[torch.Tensor | None]  # per parameter: True where the update is kept




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
# (mansu.unlearn.sharding.unlearn_with_memory_options), so every method's StorageAdamW follows it
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
    """Whether the parameters are FSDP2 shards (DTensors), see mansu.unlearn.sharding."""
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


