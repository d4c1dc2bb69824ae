"""Experiment trackers: `none` (the record on disk is the only output) or Weights & Biases."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class NoTracker:
    def start(self, config: dict, run_dir: Path, name: str) -> None:
        pass

    def log_record(self, record: dict) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


def no_tracker() -> NoTracker:
    return NoTracker()


class WandbTracker(NoTracker):
    """Logs the resolved config, every scalar metric of the record, and the record as a table.
    mode=offline writes under the run dir with no network; `wandb sync` uploads it later."""

    def __init__(self, project: str, entity: str | None, mode: str, tags: list[str]):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, tags
        self.run = None

    def start(self, config: dict, run_dir: Path, name: str) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", self.mode)
        self.run = wandb.init(project=self.project, entity=self.entity, mode=mode, name=name,
                              dir=str(run_dir), config=config, tags=self.tags, reinit=True)

    def log_record(self, record: dict) -> None:
        import wandb

        if self.run is None:
            return
        scalars = dict(flatten(record.get("metrics", {})))
        scalars.update(flatten(record.get("verdicts", {}), "verdicts"))
        self.run.log({k: v for k, v in scalars.items() if isinstance(v, (int, float, bool))})
        rows = [[k, str(v)] for k, v in sorted(scalars.items())]
        self.run.log({"record": wandb.Table(columns=["metric", "value"], data=rows)})

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None


def wandb_tracker(*, project: str = "mansu", entity: str | None = None, mode: str = "offline",
                  tags: list[str] | None = None) -> WandbTracker:
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
    return WandbTracker(project, entity, mode, list(tags or []))


def flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from flatten(value, name)
        else:
            yield name, value
