"""The `mansu` console script: Hydra's entry point, a record left by every run whatever happens,
one-line errors, and the callback that checks the output folder and sums up a sweep."""

from __future__ import annotations

import logging
import secrets
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mansu.errors import one_line, root_cause
from mansu.io.record import (
    write_failure_record,
)
from mansu.io.safeguards import (
    SetupError,
    check_writable,
    claim_run_dir,
    quiet_log_file_errors,
    release,
    release_claim,
    reserve_space,
)
from mansu.preflight import report as preflight_report
from mansu.sweep import finished_before, job_outcome

log = logging.getLogger("mansu")



# A short id of this process, in the run and sweep folder names: two runs started in the same second
# get folders of their own (conf/config.yaml: hydra.run.dir). Cached, so it resolves the same each time.
RUN_ID = secrets.token_hex(3)


OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, use_cache=True, replace=True)


# The configs ship inside the package (mansu/conf is the repository's conf/), so a plain
# `pip install .` and `mansu` from any folder find them.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path="pkg://mansu.conf", config_name="config")
def main(cfg: DictConfig):
    if cfg.preflight:  # memory estimate from the config alone: nothing is loaded (mansu.preflight)
        return print(preflight_report(cfg, HydraConfig.get().launcher))
    from mansu.io.logs import route_library_output

    route_library_output()
    return run_guarded(cfg, Path(HydraConfig.get().runtime.output_dir),
                       multirun=HydraConfig.get().mode == RunMode.MULTIRUN)


def run_guarded(cfg: DictConfig, run_dir: Path, *, multirun: bool = False) -> dict:
    """Run, and whatever happens leave a record: a failed job writes what it measured and why it
    stopped (even on a full disk); in a sweep the other jobs go on, alone it exits with one clear
    line. The traceback goes into the record, not onto the terminal."""
    record: dict = {"status": "running", "run_dir": str(run_dir)}
    try:
        claim_run_dir(run_dir)
        try:
            finished = finished_before(cfg, run_dir)
        except SetupError:
            release_claim(run_dir)
            raise
    except SetupError as err:  # the folder is another run's: write nothing into it
        record.update(status="failed", error=f"SetupError: {err}")
        if multirun:
            log.error("%s", err)
            return record
        raise SystemExit(f"mansu: error: {err}") from None
    if finished is not None:
        release_claim(run_dir)
        from mansu.run import job_line

        log.info("%s (finished before: not run again)", job_line(finished, run_dir / "result.json"))
        return finished
    quiet_log_file_errors()
    from mansu.io.logs import ConsoleFilter

    ConsoleFilter.in_sweep = multirun
    reserve = reserve_space(run_dir)
    try:
        # Imported once logging is set up: bitsandbytes speaks at import (mansu.io.logs filters it).
        from mansu.run import run

        run(cfg, run_dir, record)
        return record
    except Exception as caught:  # a sweep must survive any one job's failure
        err = root_cause(caught)
        message = one_line(err)
        record.update(status=getattr(err, "status", "failed"),
                      error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        path = write_failure_record(run_dir / "result.json", record, reserve)
        if multirun:
            log.error("%s (record: %s)", message, path)
            return record
        raise SystemExit(f"mansu: error: {message} (record: {path})") from None
    finally:
        release(reserve)
        release_claim(run_dir)


class Safeguards(Callback):
    """conf/config.yaml hydra.callbacks. Before Hydra writes anything: the output folder must be
    writable (else one line, not Hydra's traceback). After a sweep: one line per job that did not
    finish ok, and a non-zero exit when any did not: a sweep that lost jobs must not look like a
    success."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.check_output(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.check_output(config)

    @staticmethod
    def check_output(config: DictConfig) -> None:
        try:
            check_writable(Path(config.output_root), "output folder",
                           "set output_root=... or MANSU_OUTPUTS to a writable folder")
        except SetupError as err:
            raise SystemExit(f"mansu: error: {err}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted(p.parent for p in sweep_dir.glob("*/.hydra"))
        problems = []
        for job in jobs:
            status, error = job_outcome(job)
            if status != "ok":
                problems.append(f"  {job.name}: {status}" + (f": {error}" if error else ""))
        lines = [f"mansu: sweep {sweep_dir}: {len(jobs) - len(problems)} of {len(jobs)} jobs ok",
                 *problems]
        print("\n".join(lines), file=sys.stderr)
        if problems:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
