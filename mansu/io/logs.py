"""What the terminal shows: mansu's stage lines, warnings that concern the user, errors, the table.
Everything else (bitsandbytes' per-layer int8 notices, its `kernels` notice, transformers' and
Python warnings raised inside libraries) goes only to the job's `run.log`, which keeps every record
(conf/hydra/job_logging/mansu.yaml wires the filter to the console handler alone).
"""

from __future__ import annotations

import logging

# Library loggers whose notices below ERROR say nothing a mansu user can act on.
LIBRARY_LOGGERS = ("bitsandbytes", "transformers", "accelerate", "huggingface_hub", "torch")
# mansu's own INFO lines worth a terminal line: the stages and the record (mansu), a model built
# or converted (mansu.models.loaders). Cache reuse and the like stay in run.log.
CONSOLE_INFO_LOGGERS = ("mansu", "mansu.models.loaders")


def _within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


# A sweep's jobs run one after another in one process: there the terminal gets one line per job
# (mansu.run) and these detail loggers (stage lines, each job's own table) go to run.log only.
SWEEP_DETAIL_LOGGERS = ("mansu.stage", "mansu.table")


class ConsoleFilter(logging.Filter):
    """Keeps a record on the console unless it is library chatter or a minor mansu INFO line."""

    in_sweep = False  # set by mansu.run for a multirun's jobs

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.name in SWEEP_DETAIL_LOGGERS:
            return not ConsoleFilter.in_sweep
        if _within(record.name, LIBRARY_LOGGERS):
            return False
        if record.name == "py.warnings":  # a Python warning raised from an installed library
            return "site-packages" not in str(record.args[0] if record.args else record.msg)
        if record.name.startswith("mansu") and record.levelno < logging.WARNING:
            return record.name in CONSOLE_INFO_LOGGERS
        return True


def route_library_output() -> None:
    """Send Python warnings and transformers' log records through the job's handlers (console
    filtered, run.log complete) instead of straight to stderr, and drop transformers' weight-loading
    progress bar (a bar per model load, nothing to watch)."""
    import transformers

    logging.captureWarnings(True)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
