"""What a run checks and sets up before any work, so that a fault costs seconds, not a lost result:
its folder is its own, the output and cache folders are writable, the disk can hold its artifacts,
a failure record can still be written on a full disk, and a log file that cannot be written says
so once instead of once per log line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

CLAIM = ".mansu-run"  # marks a run folder as taken by one run
RESERVE = ".record-reserve"
RESERVE_BYTES = 1 << 20  # room for the failure record when the disk fills up
DISK_MARGIN_BYTES = 64 << 20


class SetupError(RuntimeError):
    """The run cannot start where and as it was asked to; the message says what to change."""


def claim_run_dir(run_dir: Path) -> None:
    """Take the run folder for this run alone: two runs writing one folder would mix their files.
    The claim lasts while the run runs (release_claim); one left by a process that died on this host
    (killed, out of memory) is taken over, so rerunning a sweep resumes its crashed jobs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = run_dir / CLAIM
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = claim.read_text(errors="replace").strip()
            if not (claim_is_stale(owner) and take_over(claim, owner)):
                raise SetupError(f"run folder {run_dir} is already used by another run ({owner}); "
                                 f"give each run its own hydra.run.dir (if that run is no longer "
                                 f"running, delete {claim})") from None
        except OSError as err:
            raise SetupError(f"output folder {run_dir} is not writable ({err.strerror}); "
                             f"set output_root=... or MANSU_OUTPUTS to a writable folder") from None
    else:
        raise SetupError(f"run folder {run_dir} was claimed by another run just now; "
                         f"give each run its own hydra.run.dir")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))


def release_claim(run_dir: Path) -> None:
    (run_dir / CLAIM).unlink(missing_ok=True)


def claim_is_stale(owner: str) -> bool:
    """Only a claim from this host can be checked: its process is gone. Another host's claim is
    left alone (its run may still be going); the error says how to release it."""
    try:
        info = json.loads(owner)
        host, pid = info["host"], int(info["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def take_over(claim: Path, owner: str) -> bool:
    """Move the dead run's claim aside; False if another process took it first (the rename fails,
    or what was moved is no longer the dead run's claim, which is then put back)."""
    aside = claim.with_name(f"{CLAIM}.stale-{os.getpid()}")
    try:
        os.rename(claim, aside)
    except FileNotFoundError:
        return True  # removed meanwhile: try to create it again
    if aside.read_text(errors="replace").strip() != owner:
        os.rename(aside, claim)
        return False
    aside.unlink(missing_ok=True)
    return True


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Create `folder` and a file in it, or fail naming the folder and what to set instead."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise SetupError(f"{what} {folder} is not writable ({err.strerror}); {fix}") from None


def check_free_disk(needs: dict[Path, int]) -> None:
    """`needs` maps folders to the bytes the run will write there; folders on one disk add up."""
    by_device: dict[int, tuple[Path, int]] = {}
    for folder, size in needs.items():
        device = folder.stat().st_dev
        first, total = by_device.get(device, (folder, 0))
        by_device[device] = (first, total + size)
    for folder, total in by_device.values():
        free = shutil.disk_usage(folder).free
        if free < total + DISK_MARGIN_BYTES:
            raise SetupError(f"not enough free disk for {folder}: the run's artifacts need about "
                             f"{gib(total + DISK_MARGIN_BYTES)}, {gib(free)} free; free some space or "
                             f"point output_root / cache_dir elsewhere (eval.cache=false halves it)")


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def reserve_space(run_dir: Path) -> Path | None:
    """A small file to delete when the disk is full, so the failure record still fits."""
    path = run_dir / RESERVE
    try:
        with path.open("wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
            f.flush()
            os.fsync(f.fileno())
        return path
    except OSError:
        path.unlink(missing_ok=True)
        return None


def release(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def quiet_log_file_errors() -> None:
    """A log file that cannot be written (a full disk) is reported once and dropped; the default
    prints a traceback block for every later log call."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and not getattr(handler, "_mansu_quiet", False):
            handler._mansu_quiet = True
            handler.handleError = _drop_once(root, handler)


def _drop_once(root: logging.Logger, handler: logging.FileHandler):
    def handle_error(record: logging.LogRecord) -> None:
        if handler in root.handlers:
            root.removeHandler(handler)
            err = sys.exc_info()[1]
            reason = getattr(err, "strerror", None) or err
            print(f"mansu: log file {handler.baseFilename} cannot be written ({reason}); "
                  f"logging to the terminal only", file=sys.stderr)
    return handle_error
