"""The memory options of the unlearning stage: sharding over the job's GPUs (`distributed: fsdp`),
gradient checkpointing, and the optimizer kind (`optimizer:`, bitsandbytes 8-bit / paged AdamW).

Sharding uses torch's FSDP2 (`fully_shard`), the engine accelerate's `fsdp_version: 2` wraps:
accelerate 1.15 silently falls back to DistributedDataParallel when the processes have no GPU
(AcceleratorState only turns FSDP on for MULTI_GPU-like types), so a CPU/gloo test of it would test
DDP. Calling FSDP2 directly gives one code path for the CPU test and the GPU cluster.

How a sharded job runs: every rank (one process per GPU, started by SLURM's tasks or torchrun)
runs the whole pipeline; only the unlearning is sharded. The loaded model is parked on the CPU, a
copy is built on the meta device, each decoder layer and the root are `fully_shard`ed and filled
from the loaded weights, the method trains it (frozen references are sharded the same way), then
the full weights are gathered back into the parked model on every rank. Every rank sees the same
batches, so the averaged gradient equals the one-process gradient: the records of one process and
of N processes agree within float tolerance (tests/unlearn/test_distributed.py); sharding saves memory,
it does not speed the run up. MANSU keeps its sparse optimizer state unsharded (it trains ~1% of
the weights) and refuses distributed=fsdp.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig
from torch import nn

from mansu.config import ConfigError
from mansu.context import RunContext
from mansu.unlearn.checks import UnlearnResult
from mansu.unlearn.optimizers import OPTIMIZER_KIND, OPTIMIZERS
from mansu.unlearn.reference import _copy_buffers, _sharded_skeleton

log = logging.getLogger(__name__)

DISTRIBUTED = ("none", "fsdp")


def check_memory_options(cfg: DictConfig) -> None:
    """One clear line for a memory option the run cannot honour."""
    distributed = cfg.get("distributed", "none")
    if distributed not in DISTRIBUTED:
        raise ConfigError(f"distributed: expected one of {', '.join(DISTRIBUTED)}, got {distributed!r}")
    if cfg.get("optimizer", "adamw") not in OPTIMIZERS:
        raise ConfigError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, "
                          f"got {cfg.optimizer!r}")
    if distributed == "fsdp" and str(cfg.method.get("_target_", "")).startswith("mansu.unlearn.mansu"):
        raise ConfigError("distributed=fsdp: MANSU is not sharded (it keeps a sparse optimizer state "
                          "for its circuit's ~1% of the weights on one GPU); use distributed=none "
                          "for method=mansu")


def memory_key(cfg: DictConfig) -> list[str]:
    """What of the memory options changes θu, for the unlearning stage's cache key: the optimizer
    (8-bit moments step differently). Sharding and checkpointing change memory, not results."""
    kind = cfg.get("optimizer", "adamw")
    return [] if kind == "adamw" else [f"optimizer={kind}"]


def init_distributed(cfg: DictConfig) -> int:
    """With distributed=fsdp, join the job's process group (torchrun's environment, or SLURM's
    tasks through submitit) and pin this rank's GPU; returns the world size (1 otherwise)."""
    check_memory_options(cfg)
    if cfg.get("distributed", "none") != "fsdp":
        return 1
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        log.warning("distributed=fsdp with one process: training unsharded")
        return 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unlearn_with_memory_options(method, model: nn.Module, tokenizer, forget, retain,
                                ctx: RunContext, cfg: DictConfig) -> UnlearnResult:
    """Run `method` on `model` with the run's memory options; the returned result's model is
    `model` itself, holding θu, and its info names the options."""
    check_memory_options(cfg)
    kind, checkpointing = cfg.get("optimizer", "adamw"), bool(cfg.get("gradient_checkpointing"))
    world = world_size() if cfg.get("distributed", "none") == "fsdp" else 1
    token = OPTIMIZER_KIND.set(kind)
    try:
        if checkpointing:  # non-reentrant: StorageAdamW's autograd.grad needs it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if world > 1:
            result = _unlearn_sharded(method, model, tokenizer, forget, retain, ctx, checkpointing)
        else:
            result = method(model, tokenizer, forget, retain, ctx)
    finally:
        OPTIMIZER_KIND.reset(token)
        if checkpointing:
            model.activation_checkpointing_disable()
    result.info.update(optimizer=kind, gradient_checkpointing=checkpointing,
                       distributed=cfg.get("distributed", "none"), world_size=world)
    return result


def _unlearn_sharded(method, model, tokenizer, forget, retain, ctx, checkpointing: bool
                     ) -> UnlearnResult:
    device = _device(ctx)
    state = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
    buffers = {name: b.detach().to("cpu") for name, b in model.named_buffers()}
    model.to("cpu")  # parked: the device holds only the shards while training
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    sharded = _sharded_skeleton(model, device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(sharded, state, options=StateDictOptions(full_state_dict=True))
    _copy_buffers(sharded, buffers)
    del state
    if checkpointing:
        sharded.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    result = method(sharded, tokenizer, forget, retain, ctx)
    model.load_state_dict(gathered_state(result.model))
    del sharded, result.model
    model.to(ctx.device)
    result.model = model
    return result


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the CPU, one tensor gathered at a time."""
    from torch.distributed.tensor import DTensor

    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu")
            for name, t in model.state_dict().items()}


def _device(ctx: RunContext) -> torch.device:
    if str(ctx.device).startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(ctx.device)
