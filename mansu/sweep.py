"""Rerunning a sweep into its folder resumes it: finished jobs of the same config are kept, failed
ones rerun (their record kept beside), another config's folder refused."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mansu.errors import one_line
from mansu.io.record import (
    atomic_write_text,
)
from mansu.io.safeguards import (
    SetupError,
)

# Where a run writes, not what it computes: a sweep folder moved or reached through another path
# (MANSU_OUTPUTS) still holds the same finished jobs.
WHERE_KEYS = ("output_root", "cache_dir")


def finished_before(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Rerunning a sweep into its folder resumes it: a job whose folder holds a finished record of
    the same config is done and returns that record; a failed or unreadable record is kept as
    result.attempt-<n>.json and the job runs again (its finished stages come from the cache); a
    finished record of another config is refused, since the folder is that run's."""
    import json

    path = run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("status") == "ok":
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # the run would fail on it too; the finished record stays
            raise SetupError(f"the config does not resolve ({one_line(err)})") from None
        differ = [key for key in differing_keys(old.get("config", {}), config)
                  if key not in WHERE_KEYS]
        if not differ:
            return old
        restore_hydra_files(run_dir, old)
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise SetupError(f"run folder {run_dir} holds a finished run of another config ({shown} "
                         f"differ); give this run its own hydra.sweep.dir or hydra.run.dir")
    attempt = 1
    while (run_dir / f"result.attempt-{attempt}.json").exists():
        attempt += 1
    path.replace(run_dir / f"result.attempt-{attempt}.json")
    return None


def restore_hydra_files(run_dir: Path, record: dict) -> None:
    """Hydra writes the new job's .hydra/config.yaml and overrides.yaml before any code of ours runs;
    a refused job puts the finished run's back (config resolved, as the record holds it)."""
    hydra_dir = run_dir / ".hydra"
    if not hydra_dir.is_dir():
        return
    atomic_write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(record["config"])))
    if "overrides" in record:
        atomic_write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(
            list(record["overrides"]))))


def differing_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (added and removed keys too)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for name in sorted(set(old) | set(new), key=str)
                for key in differing_keys(old.get(name, _MISSING), new.get(name, _MISSING),
                                          f"{prefix}{name}.")]
    return [] if old == new else [prefix.rstrip(".") or "config"]


_MISSING = object()


def job_outcome(job_dir: Path) -> tuple[str, str]:
    import json

    path = job_dir / "result.json"
    if not path.is_file():
        return "no record", ""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return "unreadable record", str(err)
    return str(record.get("status")), " ".join(str(record.get("error", "")).split())[:300]

