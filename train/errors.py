"""Errors a user can cause, and how the program reports them: one line, no traceback (unless ``--verbose``).

Library code raises ``ValueError`` (``CheckpointError`` is one), ``KeyError`` or ``OSError`` for bad input; the
training program adds :class:`UserError` subclasses for what only it can detect (a workdir of another run, a
checkpoint of another model, a non-finite loss). :data:`USER_ERRORS` lists everything reported as one line.
"""

from __future__ import annotations

# Exit statuses of the programs (train.main, train.export, train.report, train.score, train.sweep, train.launch,
# train.inspect): 0 done; 1 an unexpected error (a traceback); EXIT_USER_ERROR a refused command or input (one line
# on stderr); EXIT_PEER_LOST a multi-process job lost another process (one line; the same command resumes).
EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 3


class UserError(Exception):
    """A problem with the command, the config or the files given to the program; its message says what."""


class ConfigMismatchError(UserError):
    """The workdir holds a run whose saved config contradicts the command's."""


class CheckpointMismatchError(UserError):
    """A checkpoint was written for another model / adapter shape; restoring it would be partial or wrong."""


class DiskFullError(UserError):
    """A checkpoint could not be written: no space left on the device (or over quota)."""


class NonFiniteLossError(UserError):
    """The loss or the gradients became NaN/Inf and ``train.nan_policy`` is ``"stop"``."""


# Exceptions printed as one line. ValueError covers CheckpointError and the data / adapter validation errors,
# KeyError a dataset row missing a column, OSError files that cannot be read or written, ModuleNotFoundError an
# optional wheel that is not installed (the message names the pip command).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, KeyError, OSError, ModuleNotFoundError)


def one_line(error: BaseException) -> str:
    """``error`` as a single line: ``"<Type>: <message>"`` with newlines folded (KeyError's quotes removed)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])
    else:
        message = str(error)
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
