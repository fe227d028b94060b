"""Pytest fixtures: a real S3 endpoint (moto's threaded server) and a store on each backend.

Load with ``pytest_plugins = ["tests.s3_server"]`` (conftest or test module). The server runs
once per session on a free port on 127.0.0.1; its AWS environment is dummy credentials, a
region and ``AWS_ENDPOINT_URL``, with the user's own AWS config files masked so tests can
never reach a real account. Each test gets its own prefix in the shared bucket.

Fault tests stop the server and start it again on the same port (``s3_endpoint``): moto keeps
its objects in this process, not in the server thread, so what was stored survives the outage
as it would on a real server's disks, and Ray workers, whose environment names the port, reach
the restarted server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osd_io.storage import ObjectStore, open_store

__all__ = ["S3_ACCESS_KEY", "S3_BUCKET", "S3_SECRET", "MotoEndpoint", "s3_endpoint", "s3_server", "store", "store_uri"]

S3_BUCKET = "osd-fleet-test"
# Distinctive so tests can assert they never leak into logs, catalog rows or error messages.
S3_ACCESS_KEY = "AKIAOSDTEST" + uuid.uuid4().hex[:12].upper()
S3_SECRET = "test-secret-" + uuid.uuid4().hex

_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


class MotoEndpoint:
    """moto's threaded S3 server on 127.0.0.1, which a test may stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = 0  # a free port at the first start, then the same one
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if self._server is None:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        """Close the endpoint: connections are refused until :meth:`start`; stored objects stay."""
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[MotoEndpoint]:
    """The session's S3 server, for tests that take it down; use ``s3_server`` for its bucket."""
    endpoint = MotoEndpoint()
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture(scope="session")
def s3_server(s3_endpoint: MotoEndpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield ``s3://<bucket>/session`` on the session's S3 server (environment set for boto3)."""
    import boto3

    missing = tmp_path_factory.mktemp("aws") / "absent"
    with pytest.MonkeyPatch.context() as mp:  # session scope can't use the monkeypatch fixture
        for name in _AWS_ENV_TO_CLEAR:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint.url)
        mp.setenv("AWS_CONFIG_FILE", str(missing))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        boto3.session.Session().client("s3").create_bucket(Bucket=S3_BUCKET)
        yield f"s3://{S3_BUCKET}/session"


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
