"""Local paths and object-store URIs (``s3://``, ``gs://``) behind one small interface.

pyarrow's file systems do the work: a URI's file system comes from
``pyarrow.fs.FileSystem.from_uri``, so credentials follow each store's standard chain
(environment, profile, instance role) and an S3-compatible store (MinIO, Ceph, a local
test server) is reached through the standard ``AWS_ENDPOINT_URL`` variable. Ray Data and
Ray Train use the same layer, so what raylab reads here its workers read too. Nothing here
prints or stores credentials.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pyarrow.fs as pafs

from raylab.config import atomic_write_bytes
from raylab.errors import DataError

#: pyarrow's messages for a store that refused the request, and what to tell the user.
_DENIED = ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / the "
           "instance role) and their rights on this bucket")
_ACCESS_HINTS = (("AccessDenied", _DENIED), ("ACCESS_DENIED", _DENIED),
                 ("InvalidAccessKeyId", "the access key is not known to this store: check "
                  "the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / the instance role)"),
                 ("SignatureDoesNotMatch", "the secret key does not match: check the "
                  "credentials"),
                 ("NoSuchBucket", "no such bucket"),
                 ("Bucket '", "no such bucket"))


#: Schemes of the object stores pyarrow reaches (what Ray Train's storage takes too).
STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az")


#: How long a GCS request may retry before raylab reports the store as unreachable.
GCS_RETRY_LIMIT = timedelta(seconds=20)


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def was_uri(path: str | os.PathLike) -> bool:
    """A store URI that went through ``Path`` (``s3://b/x`` becomes ``s3:/b/x``): a writer
    that only writes local folders must refuse it, not create a folder named ``s3:``."""
    text = os.fspath(path)
    return is_uri(text) or any(text.startswith(f"{scheme}:/") for scheme in STORE_SCHEMES)


def absolute(path: str | os.PathLike, resolve_links: bool = False) -> str:
    """A URI as it is; a local path made absolute (how shard lists name their files),
    with ``resolve_links`` also without symbolic links (one name per file or folder)."""
    path = os.fspath(path)
    if is_uri(path):
        return path
    return os.path.realpath(path) if resolve_links else os.path.abspath(path)


def join(root: str | os.PathLike, name: str) -> str:
    """``root/name`` for a local folder or a URI."""
    root = os.fspath(root)
    return f"{root.rstrip('/')}/{name}" if is_uri(root) else os.path.join(root, name)


def as_uri(path: str, like: str | os.PathLike) -> str:
    """``path`` as a URI of ``like``'s store when ``like`` is a URI and ``path`` is the
    scheme-less path Ray reports inside that store's file system; else ``path``."""
    like = os.fspath(like)
    if not is_uri(like) or is_uri(path):
        return path
    return f"{like.split('://', 1)[0]}://{path.lstrip('/')}"


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The file system holding ``path`` and the path inside it.

    Raises:
        DataError: An unknown scheme or a URI pyarrow cannot parse.
    """
    path = os.fspath(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, rest = path.split("://", 1)
    if scheme in ("gs", "gcs") and "?" not in rest:
        # pyarrow's default lets a GCS request retry for 15 minutes (no network, no
        # credentials): a user waits for one clear line instead.
        return pafs.GcsFileSystem(retry_time_limit=GCS_RETRY_LIMIT), rest.rstrip("/")
    try:
        return pafs.FileSystem.from_uri(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot open this location ({describe(exc)}); expected a local "
                        "path or an s3:// / gs:// URI", path=path) from None


def describe(exc: BaseException) -> str:
    """A store's error as one short phrase (credentials and bucket problems named)."""
    text = " ".join(str(exc).split())
    for needle, hint in _ACCESS_HINTS:
        if needle in text:
            return hint
    return text


def kind(path: str | os.PathLike) -> str:
    """``"file"``, ``"dir"`` or ``"missing"``.

    Raises:
        DataError: The store refused the request (credentials, bucket, network).
    """
    fs, inner = resolve(path)
    try:
        info = fs.get_file_info(inner)
    except OSError as exc:
        raise DataError(f"cannot read ({describe(exc)})", path=os.fspath(path)) from None
    if info.type == pafs.FileType.File:
        return "file"
    if info.type == pafs.FileType.Directory:
        return "dir"
    return "missing"


def missing_bucket(path: str | os.PathLike) -> str | None:
    """For a URI whose bucket does not exist (or these credentials cannot see), that
    bucket's name; else None (also for local paths)."""
    if not is_uri(path):
        return None
    fs, inner = resolve(path)
    bucket = inner.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:
        found = False
    return None if found else bucket


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file (local or in a store)."""
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def open_input(path: str | os.PathLike) -> Any:
    """A seekable file object (what ``pyarrow.parquet.ParquetFile`` takes)."""
    fs, inner = resolve(path)
    return fs.open_input_file(inner)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` as one object (a store's single PUT: all of it or nothing)."""
    fs, inner = resolve(path)
    with fs.open_output_stream(inner) as stream:
        stream.write(data)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` so that a reader sees the old or the new
    content, never part of it: in a store one PUT (objects are whole or absent); on disk
    a temporary file in the same folder (created if need be), then ``os.replace``."""
    if is_uri(path):
        write_bytes(path, data)
    else:
        atomic_write_bytes(path, data)


def delete(path: str | os.PathLike) -> None:
    fs, inner = resolve(path)
    fs.delete_file(inner)


def upload_tree(local: str | os.PathLike, uri: str) -> None:
    """Copy the local folder ``local`` (recursively) to the folder at ``uri``."""
    store, inner = resolve(uri)
    pafs.copy_files(os.fspath(local), inner, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=store)


def list_files(folder: str | os.PathLike) -> list[str]:
    """Names of the files directly in ``folder`` (empty when it does not exist)."""
    fs, inner = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def list_dirs(folder: str | os.PathLike) -> list[str]:
    """Names of the folders (store prefixes) directly in ``folder`` (empty when it does
    not exist)."""
    fs, inner = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
