"""What the PostgreSQL store adds, on a real server: several writers, migrations, durability,
clear errors; and the store's console queries on both backends."""

from __future__ import annotations

import contextlib
import random
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

import conftest_pg
import psycopg
import pytest
from conftest_pg import PostgresServer, StoreBackend

from cloud_bridge.pg import PostgresCloudStore, redact
from cloud_bridge.store import EventRecord, StoreError, open_store

cloud_store_backend = conftest_pg.cloud_store_backend
postgres_server = conftest_pg.postgres_server

WAIT = 60.0  # bound on thread joins; never decides a pass by itself


def _event(seq: int, kind: str = "queue.enter", site: str = "paris-1",
           occurred_at: float | None = None) -> EventRecord:
    when = 1_700_000_000.0 + seq if occurred_at is None else occurred_at
    return EventRecord(site, seq, kind, f"payload {seq}".encode(), when)


def _sql(backend: StoreBackend, *statements: str) -> list[Any]:
    """Run statements on a connection of their own; the rows of the last one."""
    if backend.name == "sqlite":
        with contextlib.closing(sqlite3.connect(backend.url, isolation_level=None)) as conn:
            rows: list[Any] = []
            for statement in statements:
                rows = conn.execute(statement).fetchall()
            return rows
    with psycopg.connect(backend.url, autocommit=True) as pg:
        cursor = None
        for statement in statements:
            cursor = pg.execute(statement)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor is not None and cursor.description else []


# ------------------------------------------------------------------- both backends


def test_activity_counts_each_stored_event_once(cloud_store_backend: StoreBackend) -> None:
    store = cloud_store_backend.open()
    try:
        store.ingest([_event(1), _event(2, "call.end", occurred_at=500.0), _event(4)],
                     now=530.0, window=100)
        store.ingest([_event(2, "call.end"), _event(4), _event(6, "agent.login")],
                     now=540.0, window=100)  # replays change no count
        store.ingest([_event(1, site="lyon-2")], now=1.0, window=100)
        store.add_token("nice-3", "ecc1_x", 10.0, 1.0)  # a site with no event yet
        activity = {a.site_id: a for a in store.activity()}
        paris = activity["paris-1"]
        assert (paris.newest_seq, dict(paris.events_by_kind)) == (
            6, {"queue.enter": 2, "call.end": 1, "agent.login": 1}
        )
        # The ack is 2: its event happened at 500 and was stored at 530.
        assert (paris.acked_occurred_at, paris.acked_received_at) == (500.0, 530.0)
        assert dict(activity["lyon-2"].events_by_kind) == {"queue.enter": 1}
        assert activity["nice-3"].newest_seq == 0
        assert activity["nice-3"].acked_occurred_at is None
        assert dict(activity["nice-3"].events_by_kind) == {}
    finally:
        store.close()


def test_event_counts_migration_backfills_existing_events(
    cloud_store_backend: StoreBackend,
) -> None:
    store = cloud_store_backend.open()
    store.ingest([_event(n, "call.end" if n % 3 == 0 else "queue.enter") for n in range(1, 10)],
                 now=1.0, window=100)
    store.close()
    # The database as migration 1 left it, with events already in it.
    _sql(cloud_store_backend, "DROP TABLE event_counts",
         "DELETE FROM schema_migrations WHERE number = 2")
    store = cloud_store_backend.open()
    try:
        (paris,) = store.activity()
        assert dict(paris.events_by_kind) == {"queue.enter": 6, "call.end": 3}
        store.ingest([_event(10, "call.end")], now=2.0, window=100)
        assert store.activity()[0].events_by_kind["call.end"] == 4
    finally:
        store.close()
    assert _sql(cloud_store_backend, "SELECT number FROM schema_migrations ORDER BY number") == [
        (1,), (2,)
    ]


def test_config_versions_per_site(cloud_store_backend: StoreBackend) -> None:
    store = cloud_store_backend.open()
    try:
        def sign(site_id: str, version: int, yaml: bytes) -> bytes:
            return f"{site_id}/{version}".encode()

        assert store.config_versions() == {}
        store.add_config("paris-1", b"a: 1\n", sign, 1.0)
        second = store.add_config("paris-1", b"a: 2\n", sign, 2.0)
        store.add_config("lyon-2", b"b: 1\n", sign, 3.0)
        assert (second.version, second.signature) == (2, b"paris-1/2")
        assert store.config_versions() == {"paris-1": 2, "lyon-2": 1}
        latest = store.latest_config("paris-1")
        assert latest is not None and (latest.version, latest.yaml) == (2, b"a: 2\n")
    finally:
        store.close()


def test_two_processes_ingesting_one_site_store_each_event_once(
    cloud_store_backend: StoreBackend,
) -> None:
    """Two stores on one database (as two cloud processes): the site's row lock orders them."""
    total = 400
    stores = [cloud_store_backend.open(), cloud_store_backend.open()]
    acks: list[list[int]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def deliver(index: int) -> None:
        rng = random.Random(index)
        seqs = list(range(1, total + 1))
        rng.shuffle(seqs)
        try:
            start.wait(WAIT)
            for first in range(0, total, 25):
                batch = [_event(q) for q in seqs[first : first + 25]]
                acks[index].append(stores[index].ingest(batch, 1.0, window=10_000).acked_seq)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    try:
        assert not errors, errors
        assert all(a == sorted(a) for a in acks)  # each writer saw the ack only move forward
        assert max(acks[0][-1], acks[1][-1]) == total
        assert [e.seq for e in stores[0].events("paris-1", limit=total + 1)] == list(
            range(1, total + 1)
        )
        assert stores[1].activity()[0].events_by_kind == {"queue.enter": total}
        assert stores[1].acked_seq("paris-1") == total
    finally:
        for store in stores:
            store.close()


# ------------------------------------------------------------------- PostgreSQL only


def test_processes_starting_together_migrate_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    opened: list[Any] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait(WAIT)
            opened.append(PostgresCloudStore(url))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    for store in opened:
        store.close()
    assert not errors, errors
    assert len(opened) == 4
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT number FROM schema_migrations ORDER BY number").fetchall()
    assert rows == [(1,), (2,)]


def test_acks_are_durable_even_when_the_server_default_is_not(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    with psycopg.connect(url) as plain:
        assert plain.execute("SHOW synchronous_commit").fetchone() == ("off",)
    store = PostgresCloudStore(url)
    try:
        # The store's own session waits for the local WAL flush before an ack is returned.
        assert store._conn.execute("SHOW synchronous_commit").fetchone() == ("local",)
    finally:
        store.close()


def test_unique_key_refuses_a_second_copy_whatever_the_writer(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    store = PostgresCloudStore(url)
    try:
        store.ingest([_event(1)], 1.0, window=10)
    finally:
        store.close()
    with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO events VALUES ('paris-1', 1, 'x', '\\x00', 0, 0)"
        )


def test_bad_urls_and_unreachable_servers_get_clear_errors(
    postgres_server: PostgresServer,
) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(postgres_server.url("no_such_database"))
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        url = f"postgresql://edgecc:pa55word@127.0.0.1:{port}/edgecc?connect_timeout=5"
        with pytest.raises(StoreError, match="cannot open the PostgreSQL store") as refused:
            open_store(url)
    assert "pa55word" not in str(refused.value)
    assert redact(url) == f"postgresql://edgecc:***@127.0.0.1:{port}/edgecc?connect_timeout=5"
    assert redact("postgresql://h/db?sslmode=require&password=pa55word") == (
        "postgresql://h/db?sslmode=require&password=***"
    )
    with pytest.raises(StoreError, match="PostgreSQL"):
        open_store("postgresql://127.0.0.1:notaport/edgecc")


def test_a_lost_connection_is_replaced_on_the_next_call(postgres_server: PostgresServer) -> None:
    store = PostgresCloudStore(postgres_server.create_database())
    try:
        assert store.ingest([_event(1)], 1.0, window=10).acked_seq == 1
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            store.acked_seq("paris-1")  # the call that finds the connection gone fails ...
        assert store.ingest([_event(2)], 2.0, window=10).acked_seq == 2  # ... the next works
        assert [e.seq for e in store.events("paris-1")] == [1, 2]
    finally:
        store.close()


def test_a_site_link_rides_out_a_lost_database_connection(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The batch in flight is refused (UNAVAILABLE, not acked); the site's next link works."""
    import grpc
    from test_cloud_link import Cloud, enrol, open_link

    cloud = Cloud(tmp_path / "cloud", db_url=postgres_server.create_database())
    try:
        site = enrol(cloud, "paris-1")
        channel, link = open_link(cloud, site)
        with channel:
            assert link.wait_ack(0) == [0]
            link.event(1)
            assert link.wait_ack(1)[-1] == 1
            with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)",
                              (cloud.server.store._conn.info.backend_pid,))
            link.event(2)
            error = link.error()
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        channel, link = open_link(cloud, site)
        with channel:
            assert link.wait_ack(1) == [1]  # event 2 was never acknowledged: send it again
            link.event(2)
            assert link.wait_ack(2)[-1] == 2
            link.finish()
    finally:
        cloud.close()


def test_missing_postgresql_binaries_fail_rather_than_skip(monkeypatch: Any) -> None:
    monkeypatch.setattr(conftest_pg.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(conftest_pg.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="Debian package `postgresql`"):
        conftest_pg._binaries()
