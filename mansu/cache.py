"""Stage artifacts keyed by the config that produced them, shared by every run and sweep job.

A stage's result is stored under cache_dir/<stage>/<key>; the key hashes exactly the config parts
that decide it (θ0's evaluation does not depend on the method, so a sweep over methods evaluates θ0
once). Writes are atomic, so a killed job leaves either a whole artifact or none, and its rerun
resumes from the last finished stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mansu.record import atomic_write_json

log = logging.getLogger(__name__)


def key_of(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def path(self, stage: str, key: str, suffix: str) -> Path:
        return self.root / stage / f"{key}{suffix}"

    def json(self, stage: str, key: str, compute: Callable[[], dict]) -> dict:
        path = self.path(stage, key, ".json")
        if self.enabled and path.is_file():
            log.info("%s: reusing %s", stage, path)
            return json.loads(path.read_text())
        value = compute()
        atomic_write_json(path, value)
        return value

    def objects(self, stage: str, key: str, compute: Callable[[], object]) -> object:
        """Python objects holding tensors (attributions, circuits), via torch.save."""
        path = self.path(stage, key, ".pt")
        if self.enabled and path.is_file():
            log.info("%s: reusing %s", stage, path)
            return torch.load(path, weights_only=False)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(value, tmp)
        tmp.replace(path)
        return value

    def tensors(self, stage: str, key: str, compute: Callable[[], dict[str, torch.Tensor]],
                ) -> dict[str, torch.Tensor]:
        path = self.path(stage, key, ".safetensors")
        if self.enabled and path.is_file():
            log.info("%s: reusing %s", stage, path)
            return load_file(path)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in value.items()}, tmp)
        tmp.replace(path)
        return value
