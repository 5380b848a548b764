"""The errors a user can fix: bad inputs, missing or corrupt data, unusable weights or plugins.

The CLI turns exactly these (and the leaderboard's own: a conflicting record, an output path or a
run store that cannot be used) into one `error:` line and exit code 2; anything else is a bug in
the suite and keeps its traceback (so nothing is swallowed). Each module raises its own precise
type; the types of this package are defined here, below every module that raises them, and this
tuple is the one place that says which errors are the user's to fix.
"""
from __future__ import annotations

from benchmarks import DataError, DataNotFoundError
from methods.backbones import BackboneError
from methods.registry import HparamError, PluginError, UnknownMethodError

from .download import FetchError
from .record import RecordError


class ProtocolError(ValueError):
    """A protocol file is missing, malformed or has an invalid value (the message names the file
    and the key)."""


class SweepError(ValueError):
    """A sweep request that cannot be planned (seeds, names, missing defaults, devices, ...)."""


class ExecutorError(Exception):
    """The executor asked for cannot run here (its package is missing): the user can fix it."""


class NotReadyError(FileNotFoundError):
    """Data or checkpoints that planned runs need are missing or damaged (`protocols.prepare`); the
    message names every one of them and the command that fetches them."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    DataNotFoundError, DataError, BackboneError, HparamError, PluginError, UnknownMethodError,
    ProtocolError, SweepError, ExecutorError, RecordError, NotReadyError, FetchError,
)
