"""What every stage gets from the launcher besides its own config knobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STORAGE_DTYPES = ("fp32", "bf16", "bf16_master")


@dataclass(frozen=True)
class RunContext:
    """seed: the run's seed. storage: how parameters are stored while unlearning (docs/method.md, "What
    measurements ... found"): ``fp32``; ``bf16`` stepped directly, as reference code that loads a
    model in bf16 does; ``bf16_master``, bf16 weights with an fp32 master copy in the optimizer.
    scoring: the benchmark's MCQ scoring (`cloze` | `letter`), for methods that evaluate
    as they train. run_dir: this job's own folder. cache_dir: stage artifacts shared between runs and jobs.
    circuit: the forget circuit the attribution stage selected on θ0 (None when it is off).
    retain_fit: the retain part a method may fit to but not train on (mansu.benchmarks.parts)."""

    seed: int = 0
    storage: str = "fp32"
    scoring: str = "cloze"
    device: str = "cpu"
    run_dir: Path = Path(".")
    cache_dir: Path = Path("outputs/cache")
    circuit: Any = None  # mansu.attribution.circuit.Circuit selected on θ0, when the attribution stage ran
    retain_fit: Any = None  # mansu.data.Split: retain texts to fit to, never to train on (MANSU's Fisher)

    def __post_init__(self):
        if self.storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {self.storage!r}")

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32 if self.storage == "fp32" else torch.bfloat16
