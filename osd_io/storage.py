"""Object storage for artifacts and the catalog: one interface, a local and an S3 backend.

Why this shape:

* Workers write artifacts themselves and hand on URIs (references, not tensors), so every
  component needs the same small set of operations on both a local directory (tests, laptops)
  and S3-compatible storage (the fleet). :class:`ObjectStore` is that set; :func:`open_store`
  picks the backend from a URI.
* Writes are atomic: readers see the old object or the new one, never a torn one. S3 PUTs
  (and completed multipart uploads) are atomic by definition; :class:`LocalStore` writes a
  temporary file in the target directory, fsyncs it and renames it into place.
* ``if_absent=True`` is a conditional create (S3 ``If-None-Match: *``, local ``os.link``), the
  primitive that lets concurrent writers append without locks or overwrites.
* Every write records the SHA-256 of the bytes beside them (S3 user metadata ``sha256``; a
  ``user.osd_fleet.sha256`` extended attribute locally, set on the temp file before the rename
  so data and checksum appear together). Full reads verify it, so silent corruption or a
  hand-edited object raises :class:`CorruptObjectError` instead of producing a wrong model.
  Objects written by other tools carry no checksum and are returned unverified.
* Keys are relative and built from safe segments (:mod:`osd_io.keys`), so nothing can be read
  or written outside the store's root directory or ``s3://bucket/prefix``.
* S3 configuration (endpoint, region, credentials) comes only from the standard AWS
  environment variables and config files (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...): no second configuration system, and no secret
  ever passes through our arguments. Retries are bounded (botocore "standard" mode, with
  backoff), and errors are re-raised as :class:`StorageError` subclasses whose messages name
  the bucket, key and endpoint but never credentials.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from osd_core.errors import OSDError
from osd_io.keys import check_key, check_prefix

__all__ = [
    "AccessDeniedError",
    "AlreadyExistsError",
    "CorruptObjectError",
    "EndpointUnreachableError",
    "LocalStore",
    "NoSuchBucketError",
    "NotFoundError",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "StoreURIError",
    "TableLocation",
    "open_store",
]

CHUNK_SIZE = 8 * 1024 * 1024
SHA256_METADATA = "sha256"
SHA256_XATTR = "user.osd_fleet.sha256"
_TMP_PREFIX = ".tmp-"  # keys never start with ".", so temp files can't collide or be listed


# --------------------------------------------------------------------------- errors


class StorageError(OSDError):
    """Base of all storage failures; the message names the object and what was expected."""


class StoreURIError(StorageError, ValueError):
    """A store URI names no store osd-fleet can open (unknown scheme, no bucket, a remote file:)."""


class NotFoundError(StorageError, KeyError):
    """The key does not exist (also a KeyError, as for a missing mapping entry)."""


class NoSuchBucketError(StorageError):
    """The configured bucket does not exist: a configuration problem, not a missing key."""


class AlreadyExistsError(StorageError):
    """A conditional write (``if_absent=True``) found the key already present."""


class CorruptObjectError(StorageError):
    """The stored bytes do not match the SHA-256 recorded when they were written."""


class AccessDeniedError(StorageError):
    """The credentials were refused or lack permission for this bucket/key."""


class EndpointUnreachableError(StorageError):
    """The storage endpoint could not be reached within the bounded retries and timeouts."""


# --------------------------------------------------------------------------- interface


@dataclass(frozen=True)
class ObjectInfo:
    """What a write returns and :meth:`ObjectStore.info` reports.

    ``sha256`` is None only for objects written by other tools (no recorded checksum).
    """

    key: str
    size: int
    sha256: str | None


class ObjectStore(abc.ABC):
    """Flat key/value object storage under one root; keys are ``/``-separated safe names."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """Write ``data`` atomically; with ``if_absent`` raise AlreadyExistsError if present."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str], *, if_absent: bool = False) -> ObjectInfo:
        """Stream a local file into the store (never loaded whole into memory)."""

    @abc.abstractmethod
    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        """Read a whole object; with ``verify`` check it against its recorded SHA-256."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str], *, verify: bool = True) -> ObjectInfo:
        """Stream an object to a local file, atomically replacing ``path`` once verified."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes from offset ``start`` (fewer at the end of the object).

        For headers (safetensors: 8-byte length, then JSON) without downloading the object.
        Partial reads are not checksum-verified.
        """

    @abc.abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Size and recorded SHA-256 of an object, without reading it."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix`` (a plain string prefix, as in S3), sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error (idempotent, as in S3)."""

    @abc.abstractmethod
    def uri_for(self, key: str) -> str:
        """The absolute URI of ``key`` (``file://...`` or ``s3://bucket/prefix/key``)."""

    @abc.abstractmethod
    def table_location(self, key: str) -> TableLocation:
        """Where a library that does its own I/O (Delta Lake) finds the folder ``key``, and how to reach it."""


@dataclass(frozen=True, repr=False)
class TableLocation:
    """A folder of the store as a table library addresses it: a path or ``s3://`` URI plus object_store options.

    The options may hold credentials, so the repr shows the URI only.
    """

    uri: str
    storage_options: dict[str, str]

    def __repr__(self) -> str:
        return f"TableLocation({self.uri!r})"


def open_store(uri: str, **options: Any) -> ObjectStore:
    """Open the store named by ``uri``: a local path, ``file:///path`` or ``s3://bucket/prefix``.

    ``options`` go to the backend's constructor (e.g. ``max_attempts`` for S3).
    """
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StoreURIError(f"S3 URI {_redact_url(uri)!r} has no bucket; expected s3://bucket/prefix")
        return S3Store(parts.netloc, parts.path.strip("/"), **options)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreURIError(f"file URI {_redact_url(uri)!r} names a host; only local paths work")
        return LocalStore(unquote(parts.path), **options)
    if "://" in uri:
        raise StoreURIError(f"unsupported storage URI {_redact_url(uri)!r}; expected a path, file:// or s3://")
    return LocalStore(uri, **options)


def _check_range(start: int, length: int) -> None:
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _check_digest(where: str, recorded: str | None, actual: str) -> None:
    if recorded is not None and recorded != actual:
        raise CorruptObjectError(
            f"{where} is corrupt: recorded sha256 {recorded}, but the bytes hash to {actual}"
        )


def _stream_to_file(
    dest: Path, chunks: Callable[[], Any], where: str, recorded: str | None, verify: bool
) -> ObjectInfo:
    """Write ``chunks()`` to a temp file beside ``dest``, verify, then rename into place."""
    dest = Path(dest)
    tmp = dest.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}-{dest.name}"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "xb") as out:
            for chunk in chunks():
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if verify:
            _check_digest(where, recorded, digest.hexdigest())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return ObjectInfo(where, size, digest.hexdigest())


# --------------------------------------------------------------------------- local


class LocalStore(ObjectStore):
    """Objects as files under ``root``; checksums in an extended attribute of each file.

    The xattr is set on the temp file before the rename, so data and checksum are replaced
    together (a sidecar file could not be). The root must therefore be on a filesystem with
    user xattrs (ext4, xfs, btrfs, tmpfs on Linux); the constructor checks and says so.
    Unlike S3, a key cannot be both an object and a "directory" (``a`` and ``a/b``).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create local store root {self.root}: {exc.strerror}") from exc
        self._probe_xattr()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _probe_xattr(self) -> None:
        probe = self.root / f"{_TMP_PREFIX}probe-{uuid.uuid4().hex}"
        try:
            probe.touch()
            os.setxattr(probe, SHA256_XATTR, b"0")
        except (OSError, AttributeError) as exc:
            raise StorageError(
                f"local store root {self.root} does not support user extended attributes "
                f"({exc}); LocalStore records checksums in them. Use a Linux filesystem such "
                "as ext4, xfs or tmpfs."
            ) from exc
        finally:
            probe.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def table_location(self, key: str) -> TableLocation:
        return TableLocation(str(self._path(key)), {})

    def _write(self, key: str, chunks: Iterable[bytes], if_absent: bool) -> ObjectInfo:
        """Write ``chunks`` to a temp file (hashing as we go), fsync, then publish atomically."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create directory for {self.uri_for(key)}: {exc.strerror}") from exc
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            hasher, size = hashlib.sha256(), 0
            with open(tmp, "xb") as f:
                for chunk in chunks:
                    hasher.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = hasher.hexdigest()
            os.setxattr(tmp, SHA256_XATTR, digest.encode())
            if if_absent:
                try:  # link() fails if the name exists: a create-if-absent that is atomic
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExistsError(
                        f"{self.uri_for(key)} already exists (conditional write refused)"
                    ) from None
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except IsADirectoryError as exc:
            raise StorageError(f"cannot write {self.uri_for(key)}: a directory has that name") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(key, size, digest)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        return self._write(key, [data], if_absent)

    def put_file(self, key: str, path: str | os.PathLike[str], *, if_absent: bool = False) -> ObjectInfo:
        with open(path, "rb") as src:
            return self._write(key, iter(lambda: src.read(CHUNK_SIZE), b""), if_absent)

    def _open(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"no object {self.uri_for(key)}") from None

    @staticmethod
    def _recorded(f: IO[bytes]) -> str | None:
        """The checksum recorded on the open file (same inode as the bytes being read)."""
        try:
            return os.getxattr(f.fileno(), SHA256_XATTR).decode()
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        with self._open(key) as f:
            data = f.read()
            if verify:
                _check_digest(self.uri_for(key), self._recorded(f), hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, key: str, path: str | os.PathLike[str], *, verify: bool = True) -> ObjectInfo:
        with self._open(key) as f:
            info = _stream_to_file(
                Path(path), lambda: iter(lambda: f.read(CHUNK_SIZE), b""),
                self.uri_for(key), self._recorded(f), verify,
            )
        return ObjectInfo(key, info.size, info.sha256)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        _check_range(start, length)
        with self._open(key) as f:
            f.seek(start)
            return f.read(length)

    def info(self, key: str) -> ObjectInfo:
        with self._open(key) as f:
            return ObjectInfo(key, os.fstat(f.fileno()).st_size, self._recorded(f))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        base = prefix.rpartition("/")[0]
        top = self.root.joinpath(*base.split("/")) if base else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory entry (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- S3

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AllAccessDisabled", "ExpiredToken", "InvalidToken", "AccountProblem",
}


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint.

    The endpoint, region and credentials come from the standard AWS environment/config.
    ``max_attempts`` counts the first try (botocore "standard" retry mode: exponential backoff
    with jitter on throttling, 5xx and connection errors), so an unreachable endpoint fails
    after a bounded time instead of hanging. Files above ``multipart_threshold`` go up in
    ``multipart_chunksize`` parts (at least 5 MiB, an S3 rule).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
    ) -> None:
        import boto3  # imported here so local-only users need not pay for boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise StoreURIError(f"invalid S3 bucket name {bucket!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = check_key(prefix) if prefix else ""
        self.max_attempts = max_attempts
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        # Checked before botocore sees the URL: it refuses some such URLs with the URL, password
        # included, in its own message, and its errors chained to ours reach Prefect's logs.
        for variable in _ENDPOINT_VARIABLES:
            _refuse_credentials_in_url(os.environ.get(variable), variable)
        self._session = boto3.session.Session()
        try:
            self._client = self._session.client(
                "s3",
                config=Config(
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                ),
            )
        except Exception as exc:  # botocore's ValueError and its own error classes, e.g. a bad region
            raise StorageError(f"cannot set up the S3 client: {_redact_urls(str(exc))}") from None
        _refuse_credentials_in_url(self._client.meta.endpoint_url, "the AWS configuration's endpoint_url")
        self.endpoint = self._client.meta.endpoint_url
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
        )

    def __repr__(self) -> str:
        return f"S3Store({self.uri_for_prefix()!r}, endpoint={self.endpoint!r})"

    def uri_for_prefix(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _full(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def table_location(self, key: str) -> TableLocation:
        """The same endpoint, region and credentials as boto3 resolved, in object_store's option names.

        Timeouts and retries are bounded as for boto3, so an unreachable endpoint fails, not hangs.
        """
        creds = self._session.get_credentials()
        if creds is None:
            raise AccessDeniedError(
                f"no usable AWS credentials to open {self.uri_for(key)}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        frozen = creds.get_frozen_credentials()
        options = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self._client.meta.region_name or "us-east-1",
            "AWS_ACCESS_KEY_ID": frozen.access_key,
            "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
            "AWS_ALLOW_HTTP": str(self.endpoint.startswith("http://")).lower(),
            "timeout": f"{int(self._read_timeout)}s",
            "connect_timeout": f"{int(self._connect_timeout)}s",
            "max_retries": str(self.max_attempts - 1),
        }
        if frozen.token:
            options["AWS_SESSION_TOKEN"] = frozen.token
        return TableLocation(self.uri_for(key), options)

    # -- error translation: every boto call goes through _call

    def _call(self, action: str, key: str | None, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - translated or re-raised below
            translated = self._translate(exc, action, key)
            if translated is exc:
                raise
            raise translated from exc

    def _translate(self, exc: Exception, action: str, key: str | None) -> Exception:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self.uri_for(key) if key is not None else self.uri_for_prefix()
        at = f"at endpoint {self.endpoint}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "?"))
            if code == "NoSuchBucket":
                return NoSuchBucketError(
                    f"bucket {self.bucket!r} does not exist {at} (while trying to {action} "
                    f"{where}); create it or fix the storage URI"
                )
            if code in _NOT_FOUND:
                return NotFoundError(f"no object {where} {at}")
            if code in _DENIED:
                return AccessDeniedError(
                    f"access denied ({code}) trying to {action} {where} {at}; check the AWS "
                    "credentials in the environment/config and the bucket policy"
                )
            if code in ("PreconditionFailed", "412"):
                return AlreadyExistsError(f"{where} already exists (conditional write refused)")
            message = self._scrub(str(exc.response.get("Error", {}).get("Message", "")))
            return StorageError(f"cannot {action} {where} {at}: {code}: {message}")
        if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
            return EndpointUnreachableError(
                f"cannot reach S3 endpoint {self.endpoint} to {action} {where} "
                f"({type(exc).__name__} after {self.max_attempts} attempt(s)); is the endpoint "
                "(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) right and the server up?"
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return AccessDeniedError(
                f"no usable AWS credentials to {action} {where}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(f"cannot {action} {where} {at}: {self._scrub(str(exc))}")
        return exc  # ours (e.g. CorruptObjectError) or a programming error: unchanged

    def _scrub(self, text: str) -> str:
        """Belt and braces: servers may echo request details; never let a secret through."""
        creds = self._session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            for secret in (frozen.secret_key, frozen.token):
                if secret:
                    text = text.replace(secret, "***")
        return text

    # -- operations

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        digest = hashlib.sha256(data).hexdigest()
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        self._call(
            "write", key, self._client.put_object, Bucket=self.bucket, Key=self._full(key),
            Body=data, Metadata={SHA256_METADATA: digest}, **extra,
        )
        return ObjectInfo(key, len(data), digest)

    def put_file(self, key: str, path: str | os.PathLike[str], *, if_absent: bool = False) -> ObjectInfo:
        path = Path(path)
        digest, size = _hash_file(path)  # metadata travels with the first request
        full, meta = self._full(key), {SHA256_METADATA: digest}
        if if_absent and size > self._transfer_config.multipart_threshold:
            self._conditional_multipart(key, path, meta)
        elif if_absent:
            with open(path, "rb") as body:
                self._call(
                    "write", key, self._client.put_object, Bucket=self.bucket, Key=full,
                    Body=body, Metadata=meta, IfNoneMatch="*",
                )
        else:
            from boto3.s3.transfer import create_transfer_manager

            # The transfer manager (not client.upload_file) so failures keep their ClientError.
            with create_transfer_manager(self._client, self._transfer_config) as manager:
                future = manager.upload(str(path), self.bucket, full, extra_args={"Metadata": meta})
                self._call("upload", key, future.result)
        return ObjectInfo(key, size, digest)

    def _conditional_multipart(self, key: str, path: Path, meta: dict[str, str]) -> None:
        """Multipart upload whose completion is conditional (boto3's manager can't do that)."""
        full = self._full(key)
        upload = self._call(
            "start upload of", key, self._client.create_multipart_upload,
            Bucket=self.bucket, Key=full, Metadata=meta,
        )
        upload_id, parts = upload["UploadId"], []
        try:
            with open(path, "rb") as f:
                while chunk := f.read(self._transfer_config.multipart_chunksize):
                    number = len(parts) + 1
                    resp = self._call(
                        "upload part of", key, self._client.upload_part, Bucket=self.bucket,
                        Key=full, UploadId=upload_id, PartNumber=number, Body=chunk,
                    )
                    part = {"PartNumber": number, "ETag": resp["ETag"]}
                    part.update({k: v for k, v in resp.items() if k.startswith("Checksum") and k != "ChecksumType"})
                    parts.append(part)
            self._call(
                "complete upload of", key, self._client.complete_multipart_upload,
                Bucket=self.bucket, Key=full, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*",
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the original failure matters more
                pass
            raise

    def _get(self, key: str, **extra: Any) -> dict[str, Any]:
        return self._call("read", key, self._client.get_object, Bucket=self.bucket, Key=self._full(key), **extra)

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        resp = self._get(key)
        data = self._call("read", key, resp["Body"].read)
        if verify:  # metadata and bytes come from the same response, hence the same version
            recorded = resp.get("Metadata", {}).get(SHA256_METADATA)
            _check_digest(self.uri_for(key), recorded, hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, key: str, path: str | os.PathLike[str], *, verify: bool = True) -> ObjectInfo:
        # One streamed GET rather than the ranged parallel download: the checksum in the
        # response metadata then belongs to exactly the bytes we write.
        resp = self._get(key)
        recorded = resp.get("Metadata", {}).get(SHA256_METADATA)
        info = self._call(
            "download", key, _stream_to_file, dest=Path(path),
            chunks=lambda: resp["Body"].iter_chunks(CHUNK_SIZE),
            where=self.uri_for(key), recorded=recorded, verify=verify,
        )
        return ObjectInfo(key, info.size, info.sha256)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        _check_range(start, length)
        if length == 0:
            return b""
        try:
            resp = self._get(key, Range=f"bytes={start}-{start + length - 1}")
        except StorageError as exc:
            if getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code") == "InvalidRange":
                return b""  # start at or past the end: like reading past EOF
            raise
        return self._call("read", key, resp["Body"].read)

    def info(self, key: str) -> ObjectInfo:
        resp = self._call("stat", key, self._client.head_object, Bucket=self.bucket, Key=self._full(key))
        return ObjectInfo(key, resp["ContentLength"], resp.get("Metadata", {}).get(SHA256_METADATA))

    def exists(self, key: str) -> bool:
        # HEAD has no body, so a missing bucket also reads as "no such key" here.
        try:
            self.info(key)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")

        def collect() -> list[str]:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=root + prefix)
            return [obj["Key"][len(root):] for page in pages for obj in page.get("Contents", [])]

        return sorted(self._call("list", None, collect))

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object, Bucket=self.bucket, Key=self._full(key))


_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_USERINFO = re.compile(r"(?<=://)[^/\s]*@")


def _redact_url(url: str) -> str:
    """Drop any ``user:password@`` from a URL before it goes into a message."""
    return _USERINFO.sub("", url, count=1)


def _redact_urls(text: str) -> str:
    """Drop ``user:password@`` from every URL in ``text``."""
    return _USERINFO.sub("", text)


def _refuse_credentials_in_url(url: str | None, source: str) -> None:
    if url and _redact_url(url) != url:
        raise StorageError(
            f"the S3 endpoint URL {_redact_url(url)} ({source}) carries a user name or password; remove them "
            "and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead"
        )
