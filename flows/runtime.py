"""Start (or connect to) a Prefect API server and Ray once per process, and stop what was started.

Why: measured on this stack (docs/operations.md, "Runtime"), Prefect's ephemeral mode makes every Ray worker
start its own temporary API server (tens of seconds per flow), and a task runner that starts Ray
per flow run pays 5–10 s each time. So a long-lived process (the CLI, a test session, the
demo) calls :func:`start_runtime` once: it launches ``prefect server start`` on a free local
port (SQLite under a project-local ``PREFECT_HOME``) unless an API URL is given, starts Ray
(or connects to ``ray_address``) with ``PREFECT_API_URL`` in every worker's environment, and
registers :func:`stop_runtime` to run at exit. Flows then use ``RayTaskRunner()``, which finds
Ray initialised and neither starts nor stops it.

Importing this module imports neither Prefect nor Ray: the server is started and probed over
HTTP before Prefect reads its settings, so one-off commands stay fast.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from osd_core.errors import OSDError

log = logging.getLogger(__name__)

DEFAULT_HOME = Path(".osd-fleet") / "prefect"
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
SERVER_TIMEOUT_S = 180.0


class RuntimeStartError(OSDError, RuntimeError):
    """The Prefect server or Ray could not be started or reached."""


@dataclass(frozen=True)
class Runtime:
    """What this process runs flows against."""

    api_url: str
    home: Path
    ray_address: str
    started_server: bool
    started_ray: bool
    num_gpus: float


_runtime: Runtime | None = None
_server: subprocess.Popen[bytes] | None = None


def start_runtime(
    *,
    home: str | Path | None = None,
    api_url: str | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = 2,
    ui: bool = False,
    log_to_driver: bool = False,
    worker_env: Mapping[str, str] | None = None,
) -> Runtime:
    """Make Prefect and Ray ready for flows in this process; later calls return the same runtime.

    ``api_url``: use that Prefect API instead of starting a server. ``ray_address``: join that Ray
    cluster (``"auto"``, ``host:port``) instead of starting a local one with ``num_cpus`` CPUs.
    ``worker_env``: more environment for every Ray worker (e.g. ``OSD_FLEET_CACHE``).
    """
    global _runtime
    if _runtime is not None:
        return _runtime
    home = Path(home or DEFAULT_HOME).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(OFFLINE_ENV)
    os.environ["PREFECT_HOME"] = str(home)
    atexit.register(stop_runtime)  # also stops a server whose Ray failed to start
    started_server = api_url is None
    if api_url is None:
        api_url = _start_server(home, ui=ui)
    else:
        _wait_healthy(api_url.rstrip("/"), None, time.monotonic() + 30, home)
    os.environ["PREFECT_API_URL"] = api_url
    _refresh_prefect_settings()
    env = {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home), **OFFLINE_ENV, **(worker_env or {})}
    address, started_ray, gpus = _start_ray(env, ray_address, num_cpus, log_to_driver)
    _runtime = Runtime(api_url, home, address, started_server, started_ray, gpus)
    log.info("runtime ready: Prefect API %s, Ray %s (%s GPU)", api_url, address, gpus)
    return _runtime


def stop_runtime() -> None:
    """Stop what :func:`start_runtime` started: Ray first (its workers talk to the server), then the server."""
    global _runtime, _server
    runtime, _runtime = _runtime, None
    if runtime is not None and runtime.started_ray:
        import ray

        ray.shutdown()
    if "prefect" in sys.modules:  # send buffered logs and events while the server still listens
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    server, _server = _server, None
    if runtime is not None and runtime.started_server:
        os.environ.pop("PREFECT_API_URL", None)  # it named the server stopped below
    if server is not None and server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # its own process group: the server and its children
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _start_server(home: Path, *, ui: bool) -> str:
    global _server
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not ui:
        command.append("--no-ui")
    log_path = home / "server.log"
    with log_path.open("ab") as sink:
        _server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    _wait_healthy(url, _server, started + SERVER_TIMEOUT_S, home)
    log.info("Prefect server up at %s in %.1f s (log: %s)", url, time.monotonic() - started, log_path)
    return url


def _wait_healthy(url: str, process: subprocess.Popen[bytes] | None, deadline: float, home: Path) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeStartError(
                f"the Prefect server exited with status {process.returncode}; see {home / 'server.log'}"
            )
        if time.monotonic() > deadline:
            raise RuntimeStartError(f"no healthy Prefect API at {url} in time; see {home / 'server.log'}")
        time.sleep(0.25)


def _refresh_prefect_settings() -> None:
    """Prefect reads settings at import; when it is already imported, make it see the new API URL."""
    if "prefect" in sys.modules:
        import prefect.context

        prefect.context.refresh_global_settings_context()


def _start_ray(
    env_vars: dict[str, str], address: str | None, num_cpus: int | None, log_to_driver: bool
) -> tuple[str, bool, float]:
    import ray

    started = not ray.is_initialized()
    if started:
        local = address in (None, "local")
        try:
            ray.init(
                address="local" if local else address,  # "local": never join a cluster found by chance
                num_cpus=num_cpus if local else None,
                include_dashboard=False,
                runtime_env={"env_vars": env_vars},
                log_to_driver=log_to_driver,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RuntimeStartError(f"cannot start or join Ray at {address or 'a new local instance'}: {exc}") from exc
    else:
        log.warning("Ray was already initialised in this process; its workers may lack PREFECT_API_URL")
    context = ray.get_runtime_context()
    return context.gcs_address, started, float(ray.cluster_resources().get("GPU", 0.0))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
