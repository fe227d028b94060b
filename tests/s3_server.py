"""Pytest fixtures: a real S3 endpoint (moto's threaded server) and a store on each backend.

Load with ``pytest_plugins = ["tests.s3_server"]`` (conftest or test module). The server runs
once per session on a free port on 127.0.0.1; its AWS environment is dummy credentials, a
region and ``AWS_ENDPOINT_URL``, with the user's own AWS config files masked so tests can
never reach a real account. Each test gets its own prefix in the shared bucket.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.storage import ObjectStore, open_store

__all__ = ["S3_BUCKET", "S3_SECRET", "s3_server", "store", "store_uri"]

S3_BUCKET = "osd-fleet-test"
# Distinctive so tests can assert it never leaks into an error message.
S3_SECRET = "test-secret-" + uuid.uuid4().hex

_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start moto's S3 server and yield ``s3://<bucket>/session`` (environment set for boto3)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: a free port
    server.start()
    host, port = server.get_host_and_port()
    missing = tmp_path_factory.mktemp("aws") / "absent"
    with pytest.MonkeyPatch.context() as mp:  # session scope can't use the monkeypatch fixture
        for name in _AWS_ENV_TO_CLEAR:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_CONFIG_FILE", str(missing))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        boto3.session.Session().client("s3").create_bucket(Bucket=S3_BUCKET)
        try:
            yield f"s3://{S3_BUCKET}/session"
        finally:
            server.stop()


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store URI on each backend (the s3 one starts the server lazily)."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_server')}/{uuid.uuid4().hex}"


@pytest.fixture
def store(store_uri: str) -> ObjectStore:
    """A fresh, empty :class:`ObjectStore`, once per backend."""
    return open_store(store_uri)
