"""Fixtures: real PostgreSQL, Redis, worker processes and the gRPC gateway.

A service that is missing fails the tests loudly in CI (CI=true) and skips them, saying
why, elsewhere; so does ``../shared/data``.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import redis
from sqlalchemy import create_engine, text

from pml.app import App
from pml.client import PmlClient
from pml.demo import EXAMPLE_IMAGE_DIR, SERVE_IMAGE, TRAIN_IMAGE
from pml.gateway.server import build_server
from pml.images import add_image
from pml.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("PML_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PML_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "docker: needs a Docker engine and the example images (scripts/docker-engine, scripts/docker-images)"
    )


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing service or data set must never pass silently."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)", pytrace=False)
    pytest.skip(reason)


def shared_data_dir() -> Path:
    configured = os.environ.get("PML_SHARED_DATA")
    return Path(configured) if configured else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        missing(f"shared data folder {path} is missing")
    return path


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, dropped afterwards."""
    if not _port_open("127.0.0.1", 5432):
        missing("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"pml_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_namespace() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        missing("Redis is not running on 127.0.0.1:6379")
    namespace = f"pml-test-{uuid.uuid4().hex[:10]}"
    yield namespace
    for key in client.scan_iter(f"{namespace}*"):
        client.delete(key)


@dataclass
class Stack:
    """The service as deployed: PostgreSQL, Redis, worker processes, a gateway."""

    app: App
    target: str
    admin_key: str
    home: Path
    logs: list[Path]

    def client(self, account: str = "", api_key: str = "") -> PmlClient:
        return PmlClient(self.target, account=account, api_key=api_key, admin_key=self.admin_key)

    def new_account(self, fhir_folder: Path) -> PmlClient:
        admin = self.client()
        account_id = f"acct-{uuid.uuid4().hex[:10]}"
        admin.create_account(account_id, {"type": "folder", "path": str(fhir_folder)})
        key = admin.create_api_key(account_id, "tests")
        admin.close()
        return self.client(account_id, key)

    def worker_log_tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in self.logs
        )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_namespace: str) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("pml-home")
    admin_key = secrets.token_urlsafe(16)
    settings = Settings(
        home=home, database_url=postgres_url, redis_url=REDIS_URL, redis_namespace=redis_namespace,
        admin_key=admin_key,
    )
    app = App(settings)
    with app.session() as session:
        add_image(session, TRAIN_IMAGE, EXAMPLE_IMAGE_DIR)
        add_image(session, SERVE_IMAGE, EXAMPLE_IMAGE_DIR)
    env = {
        **os.environ,
        "PML_HOME": str(home), "PML_DATABASE_URL": postgres_url, "PML_REDIS_URL": REDIS_URL,
        "PML_REDIS_NAMESPACE": redis_namespace, "PML_RAY_NUM_CPUS": "2",
        # Quick webhook retries, so the tests of retries and failures take seconds.
        "PML_WEBHOOK_BACKOFF_S": "0.2", "PML_WEBHOOK_MAX_ATTEMPTS": "3", "PML_WEBHOOK_TIMEOUT_S": "5",
    }
    workers = []
    logs = []
    for queues in ("curate,evaluate,deploy,notify", "tune"):
        log = home / f"worker-{queues.replace(',', '-')}.log"
        logs.append(log)
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "pml.cli", "worker", "--queues", queues, "--threads", "2"],
                env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
            )
        )
    server, port = build_server(app, "127.0.0.1:0")
    yield Stack(app=app, target=f"127.0.0.1:{port}", admin_key=admin_key, home=home, logs=logs)
    server.stop(grace=1)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
    app.close()


def wait_for(predicate, timeout_s: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def tuning_app(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[App]:
    """An App on the test PostgreSQL with a local Ray in this process, for calling the tune
    step directly (no broker): restored Ray Tune callbacks find it as the current App."""
    from pml.app import set_current_app
    from pml.tuning.tuner import ensure_ray, shutdown_ray

    # One GPU declared to Ray (none is on the machine): Ray hands it to a trial that asks for
    # it, so the tests see the assigned GPU reach the training job.
    settings = Settings(home=tmp_path_factory.mktemp("tuning-home"), database_url=postgres_url,
                        ray_num_cpus=2, ray_num_gpus=1)
    app = App(settings)
    set_current_app(app)
    ensure_ray(settings)
    yield app
    shutdown_ray()
    set_current_app(None)
    app.engine.dispose()


@pytest.fixture(scope="session")
def http_base(stack: Stack) -> Iterator[str]:
    """The HTTP/JSON API of the stack's store, served by uvicorn on a free loopback port."""
    from pml.http.server import start_http_server

    server = start_http_server(stack.app, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.port}"
    server.stop()
