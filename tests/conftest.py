"""Shared fixtures: the real config composed with hydra.compose, overridden to tiny sizes.

The tiny model is injected once per session into a session cache folder and reused by every test
that runs the pipeline, the way a sweep reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models gain nothing from threads, and two threads on a busy 2-core machine thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# Small enough that injection takes seconds, big enough to learn every fact.
TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=128", "model.vocab_size=400", "model.inject_steps=1500",
    "model.target_accuracy=0.95",
    "benchmark.forget_entities=8", "benchmark.retain_entities_per_domain=4",
    "eval.bootstrap_iters=50", "eval.batch_size=64",
]


def compose_config(overrides: list[str] | tuple = (), *, cache_dir: Path | None = None,
                   tiny: bool = True):
    """The real conf/config.yaml with the tiny overrides (unless tiny=False), then the test's own."""
    extra = [f"cache_dir={cache_dir}"] if cache_dir else []
    # A test that picks another option of a group drops the tiny sizes meant for the default one.
    swapped = {o.split("=")[0] for o in overrides if "=" in o and "." not in o.split("=")[0]}
    sizes = [o for o in TINY if tiny and o.split(".")[0] not in swapped]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[*sizes, *extra, *overrides])


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny(session_cache):
    """(benchmark, model, tokenizer) of the tiny config, injected once per session."""
    from hydra.utils import instantiate

    from mansu.context import RunContext

    cfg = compose_config(cache_dir=session_cache)
    benchmark = instantiate(cfg.benchmark)
    model, tokenizer = instantiate(cfg.model, _partial_=True)(
        benchmark, RunContext(cache_dir=session_cache))
    return benchmark, model, tokenizer
