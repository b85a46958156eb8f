"""A real PostgreSQL server for the cloud store tests, and the backend parameter.

Test modules import the fixtures they use (``from conftest_pg import cloud_store_backend,
postgres_server``). The server is started once per session however many modules import it:
``initdb`` into a temporary directory, ``pg_ctl start`` on a free port of 127.0.0.1 with its
unix socket in that directory, as the ``postgres`` system user when the tests run as root
(PostgreSQL refuses to run as root). It is stopped with ``pg_ctl stop`` (then by the PID in
``postmaster.pid`` if that fails) when the last user of it finishes.

Missing binaries are a failure, not a skip: install the Debian package ``postgresql``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_bridge.store import CloudStore, open_store

START_TIMEOUT_S = 60
"""pg_ctl waits this long for the server to accept connections."""


def _binaries() -> Path:
    """The directory holding initdb, pg_ctl and postgres; fail the test run when missing."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for found in (shutil.which("pg_ctl"),):
        if found:
            candidates.append(str(Path(found).resolve().parent))
    for directory in candidates:
        if all((Path(directory) / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    pytest.fail(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: the cloud store "
        "tests need a real server. Install the Debian package `postgresql` "
        "(apt-get install -y postgresql; `make sysdeps` does it).",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One throw-away PostgreSQL cluster on 127.0.0.1."""

    def __init__(self) -> None:
        self.bin = _binaries()
        self.root = Path(tempfile.mkdtemp(prefix="edgecc-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.sockets.mkdir()
        self.port = 0
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root and there is no `postgres` system user to run "
                            "PostgreSQL as (the Debian package `postgresql` creates it)",
                            pytrace=False)
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        result = subprocess.run(
            [*self._prefix, *args], capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{Path(args[0]).name} failed ({result.returncode}): "
                        f"{result.stderr.strip()}\n{tail}", pytrace=False)

    def start(self) -> None:
        """initdb, then start on a free port (another try if the port was taken meanwhile)."""
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
        for attempt in range(3):
            self.port = _free_port()
            options = (
                f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                # A throw-away cluster: durability of the test server itself is not under test.
                "-c fsync=off -c full_page_writes=off -c max_connections=50"
            )
            result = subprocess.run(
                [*self._prefix, str(self.bin / "pg_ctl"), "-D", str(self.data),
                 "-l", str(self.root / "server.log"), "-o", options,
                 "-w", "-t", str(START_TIMEOUT_S), "start"],
                capture_output=True, text=True, timeout=START_TIMEOUT_S + 10,
            )
            if result.returncode == 0:
                return
            log = (self.root / "server.log").read_text(errors="replace")
            if "Address already in use" not in log or attempt == 2:
                pytest.fail(f"pg_ctl start failed: {result.stderr.strip()}\n{log[-2000:]}",
                            pytrace=False)

    def url(self, database: str = "postgres") -> str:
        """A URL of a database of this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        with self._lock:
            name = f"edgecc_test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown), by its PID if pg_ctl cannot, and remove its files."""
        try:
            if (self.data / "postmaster.pid").exists():
                stopped = subprocess.run(
                    [*self._prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                     "-w", "-t", "30", "stop"],
                    capture_output=True, timeout=40,
                )
                pid_file = self.data / "postmaster.pid"
                if stopped.returncode != 0 and pid_file.exists():
                    pid = int(pid_file.read_text().split()[0])
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


_shared: PostgresServer | None = None
_users = 0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server, shared by every module that imports this fixture."""
    global _shared, _users
    if _shared is None:
        server = PostgresServer()
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        _shared = server
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.stop()
            _shared = None


@dataclass
class StoreBackend:
    """Where one test keeps its cloud store: a fresh SQLite file or PostgreSQL database."""

    name: str
    """``sqlite`` or ``postgresql``."""
    url: str
    """What ``open_store`` (and ``CloudConfig.db_url``) takes."""

    def open(self) -> CloudStore:
        """Open (or open again) this test's store."""
        return open_store(self.url)


@pytest.fixture(params=["sqlite", "postgresql"])
def cloud_store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    """Each store test runs on both backends, each time on an empty database."""
    if request.param == "sqlite":
        return StoreBackend("sqlite", str(tmp_path / "cloud.db"))
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return StoreBackend("postgresql", server.create_database())
