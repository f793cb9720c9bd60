"""How and where a run executes: workers, resources, storage. Plain data, no Ray import."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from raylab.data.fs import STORE_SCHEMES
from raylab.errors import ConfigError, StorageError

# Schemes pyarrow's filesystem layer (which Ray Train uses for storage) understands.
REMOTE_SCHEMES = STORE_SCHEMES
#: Free space a local --storage needs before a run starts; RAYLAB_MIN_FREE_MB overrides.
DEFAULT_MIN_FREE_MB = 100.0
MIN_FREE_ENV = "RAYLAB_MIN_FREE_MB"


@dataclass
class RunOptions:
    """Scale-out and storage flags shared by ``train`` and ``tune``.

    Attributes:
        workers: data-parallel Train workers; 0 runs the loop in the driver process
            (Ray Train's in-process mode, handy for debugging and quick tests). With
            ``max_workers`` it is the elastic minimum.
        max_workers: 0 for a fixed worker count; else the run is elastic
            (``--workers MIN-MAX``): it starts with as many workers as the cluster fits, up
            to this, and after a lost node continues on fewer (at least ``workers``)
            instead of waiting for a replacement.
        cpus_per_worker: CPUs per worker; Ray sets the worker's torch thread count to it.
        gpus_per_worker: GPUs per worker (0 = CPU training).
        storage: local folder or ``s3://``/``gs://`` URI (shared storage on a cluster).
        name: experiment name; default ``<method>-<timestamp>``.
        max_failures: worker failures tolerated; training restarts from the last checkpoint.
    """

    workers: int = 1
    max_workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage: str = "runs"
    name: str = ""
    max_failures: int = 0

    def validate(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"--workers: expected an integer >= 0, got {self.workers}")
        if self.max_workers and not 1 <= self.workers <= self.max_workers:
            raise ConfigError(f"--workers {self.workers}-{self.max_workers}: expected MIN-MAX "
                              "with 1 <= MIN <= MAX")
        # Written so that NaN fails too (every comparison with NaN is false).
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise ConfigError(f"--cpus-per-worker: expected > 0, got {self.cpus_per_worker}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise ConfigError(f"--gpus-per-worker: expected >= 0, got {self.gpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"--max-failures: expected >= -1, got {self.max_failures}")
        if self.name and ("/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"--name: expected a plain folder name, got {self.name!r}")

    @property
    def peak_workers(self) -> int:
        """The most workers the run may use at once."""
        return max(self.workers, self.max_workers)

    @property
    def is_remote(self) -> bool:
        return urlparse(self.storage).scheme in REMOTE_SCHEMES

    def resolved_storage(self) -> str:
        """Absolute local path or the URI; checks local storage is writable now.

        Failing here, before any worker starts, beats losing a run's first checkpoint.
        """
        parsed = urlparse(self.storage)
        scheme = parsed.scheme
        if scheme in REMOTE_SCHEMES:
            check_remote_storage(self.storage)
            return self.storage
        if scheme == "file":
            if parsed.netloc not in ("", "localhost") or not parsed.path:
                # `file://runs` would otherwise silently mean the working directory.
                raise StorageError(f"--storage {self.storage!r}: expected file:///ABSOLUTE/PATH "
                                   "or a plain local path")
            path = Path(parsed.path)
        elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
            raise StorageError(
                f"--storage {self.storage!r}: unknown scheme {scheme!r}; expected a local "
                f"path or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}"
            )
        else:
            path = Path(self.storage)
        path = path.expanduser().resolve()
        check_storage(path)
        return str(path)


def min_free_mb() -> float:
    """The free space (MiB) local storage needs: ``$RAYLAB_MIN_FREE_MB`` or 100."""
    text = os.environ.get(MIN_FREE_ENV, "").strip()
    if not text:
        return DEFAULT_MIN_FREE_MB
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{MIN_FREE_ENV}: expected a number of MiB >= 0, got {text!r}")
    return value


def check_storage(path: str | os.PathLike, need_mb: float | None = None) -> Path:
    """Check, before any worker starts, that a local storage folder can take a run.

    Creates ``path`` (and its parents) if needed, writes, flushes and deletes a small
    probe file, and checks the free space against ``need_mb`` (default
    :func:`min_free_mb`). Failing here beats losing a run's first checkpoint.

    Returns:
        ``path`` as a Path.

    Raises:
        StorageError: ``--storage PATH: ...`` saying what is wrong: a file in the way,
            not writable (read-only file system, permission denied, ...), or too little
            free space (how much there is and how much is needed).
    """
    path = Path(path)
    need = min_free_mb() if need_mb is None else need_mb
    where = f"--storage {path}"
    if path.exists() and not path.is_dir():
        raise StorageError(f"{where}: not writable (it is a file, expected a directory)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".raylab-write-test") as probe:
            probe.write(b"raylab storage check\n")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise StorageError(f"{where}: not writable ({exc.strerror or exc})") from None
    try:
        free = shutil.disk_usage(path).free / 2**20
    except OSError as exc:
        raise StorageError(f"{where}: cannot read its free space ({exc.strerror or exc})"
                           ) from None
    if free < need:
        raise StorageError(f"{where}: not enough free space ({free:.0f} MiB free, need "
                           f"{need:.0f} MiB; {MIN_FREE_ENV} sets the minimum)")
    return path


def check_remote_storage(uri: str) -> None:
    """Check, before any worker starts, that the store at ``uri`` answers and its bucket
    exists (Ray Train would otherwise fail with a traceback at its first write).

    Raises:
        StorageError: ``--storage URI: ...`` saying what the store answered.
    """
    from raylab.data import fs
    from raylab.errors import DataError

    try:
        if fs.kind(uri) == "file":
            raise StorageError(f"--storage {uri}: an object, expected a folder (prefix)")
        bucket = fs.missing_bucket(uri)
    except DataError as exc:
        raise StorageError(f"--storage {uri}: {exc.reason}") from None
    if bucket is not None:
        raise StorageError(f"--storage {uri}: no such bucket {bucket!r} (or these "
                           "credentials cannot see it); expected an existing bucket")


def local_path(storage: str, *parts: str) -> Path | None:
    """``storage/parts...`` as a local Path, or None for remote storage."""
    if urlparse(storage).scheme in REMOTE_SCHEMES:
        return None
    return Path(storage, *parts)




def parse_cpus(text: str | float, workers: int, joins_cluster: bool, tuning: bool) -> float:
    """``--cpus-per-worker``: a number, or ``auto``.

    ``auto`` gives each Train worker of ``raylab train`` on a local cluster an equal share
    of this machine's cores (1 worker: all of them), so that its torch threads (Ray sets
    them to the worker's CPUs) match a plain script's on the same machine. A Tune search
    keeps 1 CPU per worker, so that trials run side by side; on a cluster that is joined
    (``--address``, ``ray job submit``) the node sizes are not known here: 1, unless given.

    Raises:
        ConfigError: Neither ``auto`` nor a number.
    """
    if str(text).strip().lower() == "auto":
        if joins_cluster or tuning or workers < 1:
            return 1.0
        return float(max(1, (os.cpu_count() or 1) // workers))
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--cpus-per-worker: expected a number or auto, got {text!r}"
                          ) from None


def parse_workers(text: str) -> tuple[int, int]:
    """``--workers`` text: ``"N"`` -> ``(N, 0)`` (fixed), ``"MIN-MAX"`` -> ``(MIN, MAX)``.

    Raises:
        ConfigError: Anything else.
    """
    lo, sep, hi = str(text).strip().partition("-")
    try:
        workers, most = int(lo), int(hi) if sep else 0
    except ValueError:
        raise ConfigError(f"--workers: expected N or MIN-MAX (e.g. 2 or 1-4), got {text!r}"
                          ) from None
    if sep and most == workers:
        most = 0  # "2-2" is a fixed size
    return workers, most
