"""Errors a user sees as one line: the ones whose message says everything, and how any other is
shortened (its type and message, no traceback; the traceback goes into the record)."""

from __future__ import annotations

from hydra.errors import InstantiationException

from mansu.config import ConfigError
from mansu.data import BenchmarkFileError
from mansu.io.safeguards import SetupError
from mansu.models.loaders import ModelLoadError
from mansu.unlearn.checks import UnlearningDiverged

# Errors whose message says everything (names the key, file:line or folder): shown without their type.
CLEAR_ERRORS = (ConfigError, BenchmarkFileError, ModelLoadError, UnlearningDiverged, SetupError,
                ValueError)


def root_cause(err: BaseException) -> BaseException:
    """Hydra wraps a builder's error in InstantiationException; the builder's own error is the
    clear one."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return text if isinstance(err, CLEAR_ERRORS) else f"{type(err).__name__}: {text}"
