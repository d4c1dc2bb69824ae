"""The result record: one flat JSON document per run, its terminal summary, atomic writes (the
verdicts are mansu.verdicts')."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGES = ("torch", "transformers", "bitsandbytes", "lm_eval", "hydra-core", "omegaconf",
            "accelerate", "wandb", "mansu")


def atomic_write_json(path: str | Path, obj) -> Path:
    """Write to a temp file in the same folder, fsync, rename: a killed job leaves the old file or
    the new one, never half of one."""
    return _atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=_jsonable))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic_write(path, lambda f: f.write(text))


def _atomic_write(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_failure_record(path: Path, record: dict, reserve: Path | None = None) -> str:
    """Write a failed run's record whatever the disk says: on a full disk, free the run's reserve
    and write it without its traceback; if even that fails, print it to stderr. Returns where it went."""
    try:
        return str(atomic_write_json(path, record))
    except OSError:
        if reserve is not None:
            reserve.unlink(missing_ok=True)
    slim = {k: v for k, v in record.items() if k not in ("traceback", "environment")}
    try:
        return str(atomic_write_json(path, slim))
    except OSError as err:
        print(f"mansu: cannot write {path} ({err.strerror}); the record follows on one line",
              file=sys.stderr)
        print(json.dumps(slim, default=_jsonable), file=sys.stderr)
        return "stderr"


def atomic_save_tensors(path: Path, tensors: dict) -> Path:
    """safetensors file written beside and renamed, like atomic_write_json: a file of its own, never a
    link to a cache entry, so changing the cache never changes a finished run."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": versions, "git": git_state()}


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def summary_table(record: dict) -> str:
    """A few lines for the terminal: accuracies of the four models, the gap, the verdicts."""
    acc = record["metrics"]["accuracy"]
    columns = [("θ0", "theta0"), ("θu", "thetau"), ("Q(θ0)", "q_theta0"), ("Q(θu)", "q_thetau")]
    columns = [(label, key) for label, key in columns if key in acc]
    lines = [f"{'':10s}" + "".join(f"{label:>9s}" for label, _ in columns)]
    for split in acc["theta0"]:
        lines.append(f"{split:10s}" + "".join(f"{acc[key][split]['accuracy']:9.3f}"
                                               for _, key in columns))
    gap = record["metrics"].get("ptq_gap")
    if gap:
        lines.append(f"PTQ gap ({record['quantizer']}): {gap['value']:+.3f} "
                     f"[{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}]")
    for name, v in record.get("verdicts", {}).items():
        state = v.get("outcome") or {True: "holds", False: "FAILS", None: "not measured"}[v["holds"]]
        margin = "" if v["margin"] is None else f" (margin {v['margin']:+.3f})"
        lines.append(f"{name:24s} {state}{margin}")
    return "\n".join(lines)
