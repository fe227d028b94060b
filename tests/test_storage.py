"""Storage layer on both backends: a real directory and a real (moto) S3 server, no mocks."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import traceback
from pathlib import Path

import pytest

from osd_io.keys import InvalidNameError, check_key, check_prefix, join_key, safe_name
from osd_io.storage import (
    AccessDeniedError,
    AlreadyExistsError,
    CorruptObjectError,
    EndpointUnreachableError,
    LocalStore,
    NoSuchBucketError,
    NotFoundError,
    ObjectStore,
    S3Store,
    StorageError,
    open_store,
)
from tests.s3_server import S3_BUCKET, S3_SECRET

pytest_plugins = ["tests.s3_server"]

MiB = 1024 * 1024


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("name", ["llama-3.1-8b", "v1.2", "a", "A_b-c.d", "x" * 128, "deadbeef" * 5])
def test_safe_name_accepts(name: str) -> None:
    assert safe_name(name) == name


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "must not be empty"),
        ("x" * 129, "at most 128"),
        ("a/b", r"'a/b' contains characters outside"),
        ("a b", "contains characters outside"),
        ("caf\u00e9", "contains characters outside"),
        ("nul\x00", "contains characters outside"),
        (".hidden", "must not start with '.'"),
        ("..", "must not start with '.'"),
        ("a..b", r"must not contain '\.\.'"),
    ],
)
def test_safe_name_refuses(name: str, match: str) -> None:
    with pytest.raises(InvalidNameError, match=match):
        safe_name(name)


def test_invalid_name_is_value_error() -> None:
    with pytest.raises(ValueError):
        safe_name("../x")


def test_join_key() -> None:
    assert join_key("models", "llama", "v1", "delta.safetensors") == "models/llama/v1/delta.safetensors"
    with pytest.raises(InvalidNameError, match="at least one part"):
        join_key()
    with pytest.raises(InvalidNameError, match=r"'\.\./etc'"):
        join_key("models", "../etc")
    with pytest.raises(InvalidNameError, match="'/abs'"):
        join_key("/abs")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/", "a/./b", "a\\b", "~/x"])
def test_check_key_refuses(key: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid key|must be relative"):
        check_key(key)


def test_check_prefix() -> None:
    assert check_prefix("") == ""
    assert check_prefix("catalog/parts/") == "catalog/parts/"
    assert check_prefix("catalog/pa") == "catalog/pa"
    with pytest.raises(InvalidNameError):
        check_prefix("../")


# --------------------------------------------------------------------------- both backends


def test_round_trip(store: ObjectStore) -> None:
    info = store.put_bytes("models/m1/delta.bin", b"hello world")
    assert info.key == "models/m1/delta.bin"
    assert info.size == 11
    assert info.sha256 == "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    assert store.get_bytes("models/m1/delta.bin") == b"hello world"
    assert store.info("models/m1/delta.bin") == info
    assert store.exists("models/m1/delta.bin")
    assert not store.exists("models/m1/other.bin")
    store.put_bytes("models/m1/delta.bin", b"replaced")  # plain put overwrites
    assert store.get_bytes("models/m1/delta.bin") == b"replaced"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.info("empty").size == 0


def test_list_sorted_and_prefixed(store: ObjectStore) -> None:
    for key in ["b/2", "a/1", "b/1", "bb", "a/10", "c"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/1", "a/10", "b/1", "b/2", "bb", "c"]
    assert store.list("b/") == ["b/1", "b/2"]
    assert store.list("b") == ["b/1", "b/2", "bb"]  # a plain string prefix, as in S3
    assert store.list("a/1") == ["a/1", "a/10"]
    assert store.list("nothing/") == []


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put_bytes("x/y", b"1")
    store.delete("x/y")
    assert not store.exists("x/y")
    assert store.list() == []
    store.delete("x/y")  # missing: no error, as in S3


def test_uri_for(store: ObjectStore, store_uri: str) -> None:
    uri = store.uri_for("a/b.bin")
    if isinstance(store, LocalStore):
        assert uri == (Path(store_uri) / "a" / "b.bin").resolve().as_uri()
    else:
        assert uri == f"{store_uri}/a/b.bin"


def test_range_reads_safetensors_header(store: ObjectStore) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + bytes(range(16))
    store.put_bytes("m.safetensors", blob)
    (n,) = struct.unpack("<Q", store.get_range("m.safetensors", 0, 8))
    assert json.loads(store.get_range("m.safetensors", 8, n))["w"]["shape"] == [2, 2]
    assert store.get_range("m.safetensors", len(blob) - 4, 100) == bytes(range(12, 16))  # short at end
    assert store.get_range("m.safetensors", len(blob), 10) == b""  # at the end
    assert store.get_range("m.safetensors", len(blob) + 100, 10) == b""  # past the end
    assert store.get_range("m.safetensors", 3, 0) == b""
    with pytest.raises(ValueError, match="start must be >= 0"):
        store.get_range("m.safetensors", -1, 4)
    with pytest.raises(ValueError, match="length must be >= 0"):
        store.get_range("m.safetensors", 0, -4)


def test_conditional_write_refused(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("once", b"first", if_absent=True)
    with pytest.raises(AlreadyExistsError, match="once.*already exists"):
        store.put_bytes("once", b"second", if_absent=True)
    src = tmp_path / "src"
    src.write_bytes(b"third")
    with pytest.raises(AlreadyExistsError):
        store.put_file("once", src, if_absent=True)
    assert store.get_bytes("once") == b"first"
    assert store.list() == ["once"]  # no temp files left behind


def test_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB + 5))
    info = store.put_file("files/src.bin", src)
    assert info.size == src.stat().st_size
    assert store.info("files/src.bin").sha256 == info.sha256
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old content")
    assert store.get_file("files/src.bin", dest) == info
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "src.bin"]  # no temp files


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/../../b", "sp ace", ".tmp-x"])
def test_unsafe_keys_refused(store: ObjectStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidNameError):
        store.get_bytes(key)
    with pytest.raises(InvalidNameError):
        store.exists(key)
    with pytest.raises(InvalidNameError):
        store.delete(key)
    assert store.list() == []
    assert not (tmp_path / "escape").exists()


def test_not_found(store: ObjectStore, tmp_path: Path) -> None:
    for read in (
        lambda: store.get_bytes("no/such"),
        lambda: store.get_range("no/such", 0, 8),
        lambda: store.info("no/such"),
        lambda: store.get_file("no/such", tmp_path / "out"),
    ):
        with pytest.raises(NotFoundError, match="no object .*no/such") as err:
            read()
        assert isinstance(err.value, KeyError)
        assert str(err.value).startswith("no object")  # not KeyError's repr()
    assert not (tmp_path / "out").exists()


def _tamper(store: ObjectStore, key: str, data: bytes) -> None:
    """Overwrite an object's first bytes behind the store's back, keeping its recorded checksum."""
    if isinstance(store, LocalStore):
        with open(store.root / key, "r+b") as f:  # in place: the xattr stays
            f.write(data)
    else:
        assert isinstance(store, S3Store)
        recorded, old = store.info(key).sha256, store.get_bytes(key)
        store._client.put_object(  # as bit rot would: same length, same metadata
            Bucket=store.bucket, Key=store._full(key), Body=data + old[len(data):],
            Metadata={"sha256": recorded},
        )


def test_checksum_mismatch_detected(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("weights.bin", b"A" * 1000)
    _tamper(store, "weights.bin", b"B")  # one flipped byte
    with pytest.raises(CorruptObjectError, match=r"weights\.bin is corrupt: recorded sha256"):
        store.get_bytes("weights.bin")
    with pytest.raises(CorruptObjectError, match=r"weights\.bin"):
        store.get_file("weights.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # never a corrupt file at the destination
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert store.get_bytes("weights.bin", verify=False)[:2] == b"BA"


def test_objects_from_other_tools_are_unverified(store: ObjectStore) -> None:
    if isinstance(store, LocalStore):
        (store.root / "foreign").write_bytes(b"no xattr")
    else:
        assert isinstance(store, S3Store)
        store._client.put_object(Bucket=store.bucket, Key=store._full("foreign"), Body=b"no xattr")
    assert store.info("foreign").sha256 is None
    assert store.get_bytes("foreign") == b"no xattr"


def test_concurrent_conditional_writes_local(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    barrier, wins, losses = threading.Barrier(8), [], []

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes("lock", str(i).encode(), if_absent=True)
            wins.append(i)
        except AlreadyExistsError:
            losses.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert store.get_bytes("lock") == str(wins[0]).encode()
    assert os.listdir(tmp_path / "s") == ["lock"]


# --------------------------------------------------------------------------- open_store


def test_open_store_local(tmp_path: Path) -> None:
    for uri in (str(tmp_path / "a"), (tmp_path / "a").as_uri(), f"file://localhost{tmp_path}/a"):
        store = open_store(uri)
        assert isinstance(store, LocalStore) and store.root == (tmp_path / "a").resolve()


def test_open_store_s3_and_bad_uris(s3_server: str) -> None:
    store = open_store(f"s3://{S3_BUCKET}/fleet/prod/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == (S3_BUCKET, "fleet/prod")
    assert store.uri_for("x") == f"s3://{S3_BUCKET}/fleet/prod/x"
    assert open_store(f"s3://{S3_BUCKET}").uri_for("x") == f"s3://{S3_BUCKET}/x"
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///prefix")
    with pytest.raises(ValueError, match="invalid S3 bucket name"):
        open_store("s3://Bad_Bucket/x")
    with pytest.raises(InvalidNameError):
        open_store(f"s3://{S3_BUCKET}/../other")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="only local paths"):
        open_store("file://remote-host/x")


# --------------------------------------------------------------------------- S3 specifics


def test_s3_prefixes_are_isolated(s3_server: str) -> None:
    a, b = open_store(f"{s3_server}/iso/a"), open_store(f"{s3_server}/iso/ab")
    a.put_bytes("k", b"a")
    b.put_bytes("k", b"b")
    assert a.list() == ["k"] and b.list() == ["k"]
    assert a.get_bytes("k") == b"a"


@pytest.mark.parametrize("if_absent", [False, True])
def test_s3_multipart_put_file(s3_server: str, tmp_path: Path, if_absent: bool) -> None:
    store = S3Store(S3_BUCKET, "multipart", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB + 3))  # three parts
    key = f"big-{if_absent}"
    info = store.put_file(key, src, if_absent=if_absent)
    head = store._client.head_object(Bucket=S3_BUCKET, Key=store._full(key))
    assert head["ETag"].strip('"').endswith("-3")  # really went up in three parts
    assert store.info(key) == info
    assert store.get_bytes(key) == src.read_bytes()
    if if_absent:
        with pytest.raises(AlreadyExistsError):
            store.put_file(key, src, if_absent=True)
        uploads = store._client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix="multipart/")
        assert not uploads.get("Uploads")  # the refused upload was aborted, not left to bill


def test_s3_no_such_bucket(s3_server: str) -> None:
    store = open_store("s3://no-such-bucket-osd/x")
    with pytest.raises(NoSuchBucketError, match="bucket 'no-such-bucket-osd' does not exist at endpoint http://127.0.0.1"):
        store.put_bytes("k", b"1")
    with pytest.raises(NoSuchBucketError):
        store.list()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_fails_fast_without_secrets(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = S3Store(S3_BUCKET, "x", max_attempts=3, connect_timeout=1, read_timeout=2)
    start = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as err:
        store.put_bytes("k", b"1")
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"took {elapsed:.1f}s"
    message = str(err.value)
    assert f"cannot reach S3 endpoint {endpoint}" in message
    assert f"s3://{S3_BUCKET}/x/k" in message and "3 attempt(s)" in message
    assert isinstance(err.value, StorageError)
    full = "".join(traceback.format_exception(err.value))  # including the chained botocore error
    assert S3_SECRET not in full and S3_SECRET not in repr(err.value)
    with pytest.raises(EndpointUnreachableError):
        store.list()


def test_s3_missing_credentials(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"{s3_server}/nocreds")
    with pytest.raises(AccessDeniedError, match="no usable AWS credentials to write s3://.*/nocreds/k"):
        store.put_bytes("k", b"1")
