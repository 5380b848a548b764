"""The errors a user can fix: bad inputs, missing or corrupt data, unusable weights or plugins.

The CLI turns exactly these into one `error:` line and exit code 2; anything else is a bug in the
suite and keeps its traceback (so nothing is swallowed). Each module raises its own precise type;
this tuple is the one place that says which of them are the user's to fix.
"""
from __future__ import annotations

from benchmarks import DataError, DataNotFoundError
from methods.backbones import BackboneError
from methods.registry import HparamError, PluginError, UnknownMethodError

from .download import FetchError
from .executors import ExecutorError
from .schema import ProtocolError


class SweepError(ValueError):
    """A sweep request that cannot be planned (seeds, names, missing defaults, ...)."""


class NotReadyError(FileNotFoundError):
    """Data or checkpoints that planned runs need are missing or damaged (`protocols.prepare`); the
    message names every one of them and the command that fetches them."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    DataNotFoundError, DataError, BackboneError, HparamError, PluginError, UnknownMethodError,
    ProtocolError, SweepError, ExecutorError, NotReadyError, FetchError,
)
