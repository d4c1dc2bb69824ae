"""The unlearning stage: the configured method, or its cached parameter changes reapplied. A method
gets the forget split and the retain *train* part only (the scored part never reaches it)."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mansu.context import RunContext
from mansu.data import Benchmark
from mansu.io.cache import StageCache
from mansu.io.record import atomic_save_tensors
from mansu.unlearn.sharding import unlearn_with_memory_options


def unlearn(model, tokenizer, benchmark: Benchmark, ctx: RunContext, cfg: DictConfig,
            cache: StageCache, key: str, theta0: dict) -> dict:
    """Run the method, or reapply its cached parameter changes (one cache entry: the method's info
    and the changed tensors). θu = θ0 with these tensors replaced; the run folder gets its own copy
    of them as unlearned.safetensors."""

    def train() -> dict:
        method = instantiate(cfg.method)
        result = unlearn_with_memory_options(method, model, tokenizer, benchmark.forget,
                                             benchmark.retain_train, ctx, cfg)
        if result.model is not model:
            model.load_state_dict(result.model.state_dict())
        # named_parameters lists a tied weight (embeddings = lm_head) once, as safetensors needs.
        changed = {name: t.detach().cpu() for name, t in model.named_parameters()
                   if not torch.equal(t.detach().cpu(), theta0[name])}
        info = {"steps": result.steps, "losses": [float(x) for x in result.losses],
                "changed_tensors": sorted(changed), **result.info}
        return {"info": info, "changed": changed}

    stored = cache.objects("unlearn", key, train)
    changed = stored["changed"]
    missing = set(stored["info"]["changed_tensors"]) ^ set(changed)
    if missing:
        raise RuntimeError(f"unlearn entry {cache.entry('unlearn', key)}: tensors {sorted(missing)} "
                           f"do not match its list of changed tensors")
    model.load_state_dict({k: v.to(ctx.device) for k, v in changed.items()}, strict=False)
    atomic_save_tensors(ctx.run_dir / "unlearned.safetensors", changed)
    return stored["info"]
