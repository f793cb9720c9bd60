"""Errors that the CLI turns into one clear line and a non-zero exit.

Every error raised for bad user input is a :class:`RaylabError`. Its message names the
file, row or field at fault and what was expected, so that the user can act on it without
reading a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any


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
        #: The message without its location, for a caller that names the place its own way.
        self.reason = message
        self.path = None if path is None else os.fspath(path)
        self.line = line


class RegistryError(RaylabError):
    """An unknown or duplicate method name."""


class CheckpointError(RaylabError):
    """A checkpoint is missing, unreadable or from another method."""


class StorageError(RaylabError):
    """The storage path or URI cannot be used."""


class ResourceError(RaylabError):
    """A run asks for more CPUs or GPUs than the cluster has and can ever get."""


# ------------------------------------------------- shard read failures during training

#: Words of the errors that reading a file raises (pyarrow, the file system), and of those
#: that damaged Parquet data raises (then a full read may find the file).
_READ_WORDS = ("could not open", "failed to open", "no such file", "not found", "corrupt",
               "magic bytes", "deserializ", "unexpected end", "invalid", "ioerror",
               "oserror", "arrowinvalid", "arrowioerror")
_DAMAGE_WORDS = ("corrupt", "snappy", "zstd", "thrift", "deserializ", "unexpected end",
                 "decompress", "invalid", "magic bytes")
#: A file path ending in .parquet: it has a "/" (so that module names such as Ray's
#: ``ray.data._internal.datasource_v2.formats.parquet`` in a traceback are not taken for one).
_SHARD_IN_TEXT = re.compile(r"""[^\s'"`(),\[\]{}<>]*/[^\s'"`(),\[\]{}<>]*\.parquet\b""")
#: The line a traceback shows for a DataError naming a shard: "...DataError: <shard>: <reason>".
_DATA_ERROR_LINE = re.compile(rf"\bDataError: ({_SHARD_IN_TEXT.pattern}): (.+)$")
#: Local shards totalling at most this many MiB are read in full to find a damaged one
#: when the error does not name it (after a failed run only).
DEEP_CHECK_MB = 1024


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything Ray wrapped into it, each once.

    Follows ``__cause__``/``__context__``, Ray's ``cause``, Ray Train's
    ``worker_failures``, ``worker_group_error`` and ``controller_failure``.
    """
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None),
                  getattr(e, "worker_group_error", None), getattr(e, "controller_failure", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())


def exception_texts(exc: BaseException) -> list[str]:
    """``"Type: message"`` of each exception in :func:`exception_chain`."""
    texts = []
    for e in exception_chain(exc):
        try:
            texts.append(f"{type(e).__name__}: {e}")
        except Exception:  # a broken __str__ must not hide the original error
            texts.append(type(e).__name__)
    return texts


def _probe_shard(path: str, deep: bool) -> str | None:
    """What is wrong with a local Parquet file now (None: nothing found)."""
    # pyarrow here only: the CLI imports this module at start-up (`raylab --help`).
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        return "the file is missing"
    try:
        with pq.ParquetFile(path) as pf:
            if deep:
                for _ in pf.iter_batches(batch_size=65536):
                    pass
    except (pa.ArrowException, OSError) as exc:
        detail = " ".join(str(exc).replace(f"'{path}'", "").replace(path, "").split())
        return f"unreadable Parquet data: {detail or type(exc).__name__}"
    return None


def _first_bad(paths: list[str], deep: bool) -> tuple[str | None, str | None]:
    """The first of ``paths`` found missing or damaged, and what is wrong with it.

    Footers first (cheap); then, with ``deep``, every row of every file.
    """
    for full in (False, True) if deep else (False,):
        for path in paths:
            problem = _probe_shard(path, full)
            if problem:
                return path, problem
    return None, None


def _reason_in_text(text: str, path: str) -> str:
    """The end of the first line of ``text`` that names ``path``, as a short reason."""
    for line in text.splitlines():
        if path in line:
            after = line.split(path, 1)[1].lstrip("'\": ").strip()
            before = line.split(path, 1)[0].strip(" '\":")
            reason = after or before.rsplit(":", 1)[-1].strip() or before
            return " ".join(reason.split())[:200] or "could not be read"
    return "could not be read"


def shard_read_error(exc: BaseException, shards: Iterable[str] = (),
                     run_dir: str | None = None) -> DataError | None:
    """A DataError naming the shard file behind a failed run, or None if none is.

    ``exc`` is what ``fit()`` (or Ray Data on the driver) raised. A :class:`DataError`
    that reading a shard raised inside it (raylab's reader in a Ray Data task) gives the
    file and the reason; any other :class:`RaylabError` gives None (it says what is
    wrong already). ``shards`` are the dataset's input files when known. Otherwise the
    file is the first shard named in the error text (pyarrow names the file it could not
    open), else a regex match ending in ``.parquet``, else, when the error looks like a
    read error, a known local shard that is now missing or unreadable (footers always;
    every row when the shards total at most :data:`DEEP_CHECK_MB`). ``run_dir`` is
    named as where the run's checkpoints and metrics remain.
    """
    known = [s for s in dict.fromkeys(shards) if s]
    found = _shard_data_error(exc, known)
    if found is None and any(isinstance(e, RaylabError) for e in exception_chain(exc)):
        return None  # raylab's own error says what is wrong already
    text = "\n".join(exception_texts(exc))
    found = found or _shard_data_error_line(text, known)
    if found is not None:
        shard, why = found
        # A local file as it is now (the probe's words, as below); else as it was read.
        now = _probe_shard(shard, deep=False) if "://" not in shard else None
        return _shard_error(shard, now or why, run_dir)
    named = sorted((s for s in known if s in text), key=text.find)
    if not named:
        named = list(dict.fromkeys(_SHARD_IN_TEXT.findall(text)))
    culprit = reason = None
    for path in named:
        problem = _probe_shard(path, deep=False) if "://" not in path else None
        line = next((ln for ln in text.splitlines() if path in ln), "").lower()
        if problem or any(word in line for word in _READ_WORDS):
            culprit, reason = path, problem or _reason_in_text(text, path)
            break
    lowered = text.lower()
    if culprit is None and any(word in lowered for word in (*_READ_WORDS, "parquet")):
        local = [s for s in known if "://" not in s]
        try:
            total_mb = sum(os.path.getsize(s) for s in local if os.path.exists(s)) / 2**20
        except OSError:
            total_mb = float("inf")
        deep = total_mb <= DEEP_CHECK_MB and any(w in lowered for w in _DAMAGE_WORDS)
        culprit, reason = _first_bad(local, deep)
    if culprit is None:
        return None
    return _shard_error(culprit, reason, run_dir)


def _shard_error(path: str, reason: str | None, run_dir: str | None) -> DataError:
    kept = (f"; checkpoints and metrics written so far are kept in {run_dir}: restore "
            "the file (or convert the dataset again) and rerun with the same --name to "
            "resume") if run_dir else ""
    return DataError(f"shard could not be read ({reason}){kept}", path=path)


def _shard_data_error(exc: BaseException, known: list[str]) -> tuple[str, str] | None:
    """(path, reason) of a DataError naming a shard in ``exc``'s chain, or None.

    Ray keeps a task's own exception as ``RayTaskError.cause`` (and re-raises it as
    ``RayTaskError(DataError)``, whose ``cause`` is the original).
    """
    for e in exception_chain(exc):
        cause = getattr(e, "cause", None)
        error = cause if isinstance(cause, DataError) else e
        if isinstance(error, DataError) and error.path and _is_shard(error.path, known):
            return error.path, error.reason
    return None


def _shard_data_error_line(text: str, known: list[str]) -> tuple[str, str] | None:
    """(path, reason) of a DataError naming a shard, from its line in a traceback text.

    A DataError raised in a Ray Data task does not reach the caller as an object: Ray
    Data raises ``UserCodeException`` from it, and the chained cause does not survive
    the pickling back. Ray keeps the task's traceback text (``RayTaskError``'s message),
    which holds the DataError's line, ``raylab.errors.DataError: <path>: <reason>``.
    """
    for line in text.splitlines():
        for path in known:  # also one whose name has spaces
            if f"DataError: {path}: " in line:
                return path, line.split(f"DataError: {path}: ", 1)[1].strip()
        found = _DATA_ERROR_LINE.search(line)
        if found:
            return found[1], found[2].strip()
    return None


def _is_shard(path: str, known: list[str]) -> bool:
    return path in known or _SHARD_IN_TEXT.fullmatch(path) is not None
