"""The one error type that means "the input is wrong": the command prints its message on one line and exits with 2.

Every check of what a user gives (configs, data, files, run directories) raises a subclass of :class:`DCCCLError`
with a message that says what is wrong and what to do. Anything else that goes wrong is a bug and keeps its
traceback. The subclasses also derive from the built-in type that fits (``ValueError``, ``FileNotFoundError``...),
so code that catches those keeps working.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path
from typing import Optional


class DCCCLError(Exception):
    """Bad input: a config, a data folder, a file or a run directory is not what dcccl needs."""


class ConfigError(DCCCLError, ValueError):
    """A setting is out of range, inconsistent with another one, or names something that does not exist."""


class DataError(DCCCLError, ValueError):
    """The data cannot serve the method: empty or missing folders, unreadable images, an impossible class split."""


class MissingFileError(DCCCLError, FileNotFoundError):
    """A file or folder that the input names does not exist."""


# Out of space: the disk is full, the user's quota is used up, or the file would exceed the size limit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(DCCCLError, OSError):
    """A file could not be written for lack of space; names the file.

    Args:
        code: The ``errno`` of the failed write (one of :data:`DISK_FULL_ERRNOS`).
        path: The file being written.
    """

    def __init__(self, code: int, path: str | Path) -> None:
        super().__init__(code, os.strerror(code), str(path))

    def __str__(self) -> str:
        return (f"disk full / file too large while writing {self.filename} ({self.strerror}): free space (or raise "
                "the file size limit) and run the same command again; finished stages are kept")


# Lines of jsonargparse's messages that say nothing to a user (a class that fails is reported as a Union mismatch).
_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
                 "Given value:", "- Expected a <class 'NoneType'>")


def one_line(message: str) -> str:
    """``message`` on one line, without the parser's type-matching details."""
    lines = (line.strip() for line in message.splitlines())
    return " ".join(line.removeprefix("- ") for line in lines if line and not line.startswith(_PARSER_NOISE))


def user_error_message(err: BaseException) -> Optional[str]:
    """What is wrong with the user's input, in one line; ``None`` when ``err`` is a bug.

    Bad input is a parse error, a :class:`DCCCLError` or a full disk, wherever it is in the chain of explicit causes
    (the parser re-raises what a class's ``__init__`` raises as its own error, ``from`` the original).
    """
    if isinstance(err, argparse.ArgumentError):
        return one_line(str(err))
    cause: Optional[BaseException] = err
    while cause is not None:
        if isinstance(cause, DCCCLError):
            return one_line(str(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return str(DiskFullError(cause.errno, cause.filename or "a file"))
        cause = cause.__cause__
    return None
