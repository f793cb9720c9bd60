"""Errors that the CLI turns into one clear line and a non-zero exit.

Every error raised for bad user input is a :class:`RaylabError`. Its message names the
file, row or field at fault and what was expected, so that the user can act on it without
reading a traceback.
"""

from __future__ import annotations

import os


class RaylabError(Exception):
    """Base class of every error raylab reports to the user as one line."""

    exit_code = 2


class ConfigError(RaylabError):
    """A configuration key, value or file is wrong."""


class DataError(RaylabError):
    """An input dataset (raw files, shards, manifest) is missing or malformed."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{os.fspath(path)}"
            if line is not None:
                where += f":{line}"
            where += ": "
        super().__init__(where + message)
        self.path = None if path is None else os.fspath(path)
        self.line = line


class RegistryError(RaylabError):
    """An unknown or duplicate method name."""


class CheckpointError(RaylabError):
    """A checkpoint is missing, unreadable or from another method."""


class StorageError(RaylabError):
    """The storage path or URI cannot be used."""
