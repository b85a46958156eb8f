"""The cloud's gRPC server: enrolment, the site link, backups; health and reflection.

This module is the translation layer between the generated ``proto`` code and the cloud's
own parts (``CertificateAuthority``, ``CloudStore``, ``BackupStore``); nothing else in
``cloud_bridge`` imports generated code.

Two TLS ports on one server:

- the *link* port (``grpc_port``) requires a client certificate signed by the cloud's CA
  (mutual TLS); every Bridge method is served there;
- the *enrol* port (``enrol_port``) is server-authenticated TLS only, for sites that have no
  certificate yet; Enrol, health and reflection answer there, the Bridge methods refuse.

All database and disk work runs on one worker thread, never on the event loop.

The same process serves the central IT console over HTTP (``cloud_bridge.console``) when
``CloudConfig.http_port`` is set, and watches the store for config versions written by
``edgecc cloud push-config`` (another process) to send them down the sites' live links.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_bridge.auth import SiteAuthInterceptor, current_site
from cloud_bridge.backups import CHUNK_LIMIT, BackupError, BackupStore, check_backup_id
from cloud_bridge.ca import CertificateAuthority, CertificateError, SiteCertificate
from cloud_bridge.console import ConsoleServer, LinkState, SiteView, build_console_app, site_views
from cloud_bridge.store import (
    CloudStore,
    ConfigRecord,
    EventColumns,
    TokenRejected,
    make_token,
    open_store,
)

try:
    from proto import bridge_pb2 as pb
    from proto import bridge_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "the bridge's generated code is missing: run `python -m proto.build`"
    ) from exc

log = logging.getLogger("edgecc.cloud")

T = TypeVar("T")

ENROLMENT_SERVICE = pb.DESCRIPTOR.services_by_name["Enrolment"].full_name
BRIDGE_SERVICE = pb.DESCRIPTOR.services_by_name["Bridge"].full_name

MAX_MESSAGE_BYTES = CHUNK_LIMIT + 64 * 1024
"""Largest message either way: a full backup chunk plus its envelope."""
MAX_EVENT_PAYLOAD = 256 * 1024
MAX_KIND_CHARS = 64
MAX_TOKEN_CHARS = 256
MAX_CSR_BYTES = 16 * 1024
INGEST_QUEUE_BYTES = 16 * 1024 * 1024
"""Event bytes of one link read ahead of the store at most; past it the link is not read (the
site's HTTP/2 flow control then holds its sending)."""

INGEST_DEPTH = 2
"""Batches of one link handed to the store's worker at a time (one storing, one waiting)."""

_END = object()


@dataclass(frozen=True)
class CloudConfig:
    """How the cloud server runs."""

    data_dir: Path
    """Holds the CA, the server certificate, the database (by default) and the backups."""
    bind: str = "127.0.0.1"
    """Address of both ports."""
    grpc_port: int = 50051
    """Link port (mutual TLS); 0 picks a free port."""
    enrol_port: int | None = None
    """Enrol port (server TLS); None means ``grpc_port + 1``, or a free port when that is 0."""
    db_url: str | None = None
    """Database URL or path; default ``DATA_DIR/cloud.db``."""
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    """Names (DNS or IP) in the server certificate; sites connect to one of these."""
    keep_backups: int = 7
    """Complete backups kept per site."""
    max_backup_bytes: int = 64 * 1024**3
    """Largest single backup."""
    site_cert_days: int = 365
    """Validity of a site certificate issued at enrolment."""
    reorder_window: int = 100_000
    """Events held beyond a gap at most this far past the ack; later ones are refused."""
    ingest_batch: int = 500
    """Most events stored in one transaction."""
    http_bind: str = "127.0.0.1"
    """Address of the console (it has no login: keep it local or behind a proxy)."""
    http_port: int | None = None
    """Console port; None serves no console, 0 picks a free port."""
    config_poll_s: float = 2.0
    """How often the store is checked for config versions pushed by another process."""
    heartbeat_s: float = 5.0
    """A link quiet this long gets its current Ack again, so that the site knows the cloud still
    hears it (the edge agent ends a stream that stays silent, docs/edge-agent.md)."""
    site_silence_s: float = 20.0
    """A link on which nothing has come from the site for this long (it answers each repeated
    Ack with a Heartbeat), with nothing of it waiting to be stored, is ended: the site is behind
    a dead path, and the console shows it offline (docs/central-it.md)."""


REPORTS_DIR = "site-reports"
"""Under the data directory: one JSON file per site with its last Hello and ConfigApplied."""


def record_site_report(data_dir: Path, site_id: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the site's report file (atomic rename) and return the report."""
    directory = Path(data_dir) / REPORTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{site_id}.json"
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            report = loaded
    report.update(fields)
    report["site_id"] = site_id
    temporary = directory / f".{site_id}.json.tmp"
    temporary.write_text(json.dumps(report, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
    return report


def reported_config_version(report: dict[str, Any] | None) -> int:
    """The highest config version a site's report says it runs (its Hello, or a config it
    applied); 0 when it said nothing."""
    if not report:
        return 0
    versions = [0]
    hello = report.get("hello")
    if isinstance(hello, dict) and isinstance(hello.get("config_version"), int):
        versions.append(hello["config_version"])
    applied = report.get("config_applied")
    if isinstance(applied, dict) and applied.get("ok") and isinstance(applied.get("version"), int):
        versions.append(applied["version"])
    return max(versions)


def read_site_report(data_dir: Path | str, site_id: str) -> dict[str, Any] | None:
    """One site's report (see ``read_site_reports``), None when it has none or it is unreadable."""
    path = Path(data_dir) / REPORTS_DIR / f"{site_id}.json"
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(report, dict):
            return report
    return None


def read_site_reports(data_dir: Path | str) -> dict[str, dict[str, Any]]:
    """Every site's report: ``hello`` {at, agent_version, last_seq, config_version,
    last_backup_id, last_backup_at} and ``config_applied`` {at, version, ok, error}."""
    directory = Path(data_dir) / REPORTS_DIR
    reports: dict[str, dict[str, Any]] = {}
    if not directory.is_dir():
        return reports
    for path in sorted(directory.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(report, dict):
                reports[path.stem] = report
    return reports


@dataclass
class _Link:
    """One live SiteLink stream."""

    site: SiteCertificate
    outbound: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(maxsize=256))
    config_version: int = 0
    """Newest config version the site has (its Hello) or was sent, or that existed at link-up."""
    acked: int = 0
    """The last Ack sent (repeated as the heartbeat)."""
    queued_bytes: int = 0
    """Bytes of events read but not yet stored (bounded by ``INGEST_QUEUE_BYTES``)."""
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when ingest took records off the queue."""
    heard_at: float = 0.0
    """When the last message came from the site (the link's opening at first)."""


@dataclass(frozen=True)
class _Abort:
    code: grpc.StatusCode
    details: str


def _timestamp(seconds: float | None) -> Timestamp:
    stamp = Timestamp()
    if seconds is not None:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _seconds(stamp: Any) -> float:
    return float(stamp.seconds) + stamp.nanos / 1e9


class CloudServer:
    """Builds the cloud's parts, serves them over gRPC, and stops them in order."""

    def __init__(self, config: CloudConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.load_or_create(data_dir / "ca")
        self.store: CloudStore = open_store(
            config.db_url or str(data_dir / "cloud.db"), data_dir=data_dir
        )
        self.backups = BackupStore(
            data_dir / "backups", self.store, keep=config.keep_backups,
            max_bytes=config.max_backup_bytes, clock=clock,
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-store")
        self._links: dict[str, _Link] = {}
        self._link_states: dict[str, LinkState] = {}
        self._config_watch: asyncio.Task[None] | None = None
        self.console: ConsoleServer | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self.link_port = 0
        self.enrol_port = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind both ports and start serving. Raises OSError when a port cannot be bound."""
        cert_pem, key_pem = self._server_certificate()
        public = frozenset({f"/{ENROLMENT_SERVICE}/Enrol"})
        server = grpc.aio.server(
            interceptors=[SiteAuthInterceptor(self.ca, self._is_revoked, public)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # gRPC sets SO_REUSEPORT by default: a second cloud on the same port would
                # silently share the sites' connections instead of failing to start.
                ("grpc.so_reuseport", 0),
                # Sites keep one stream open for days: let their keepalive pings through.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        pb_grpc.add_EnrolmentServicer_to_server(_EnrolmentServicer(self), server)
        pb_grpc.add_BridgeServicer_to_server(_BridgeServicer(self), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (ENROLMENT_SERVICE, BRIDGE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
        link_credentials = grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=self.ca.certificate_pem,
            require_client_auth=True,
        )
        enrol_credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        host = f"[{self.config.bind}]" if ":" in self.config.bind else self.config.bind
        self.link_port = self._bind(server, f"{host}:{self.config.grpc_port}", link_credentials)
        enrol_port = self.config.enrol_port
        if enrol_port is None:
            enrol_port = self.config.grpc_port + 1 if self.config.grpc_port else 0
        self.enrol_port = self._bind(server, f"{host}:{enrol_port}", enrol_credentials)
        await server.start()
        self._server = server
        for service in ("", ENROLMENT_SERVICE, BRIDGE_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.http_port is not None:
            app = build_console_app(self.site_views, self.clock)
            self.console = await ConsoleServer.start(
                app, self.config.http_bind, self.config.http_port
            )
        self._config_watch = asyncio.create_task(self._watch_configs(), name="config-watch")
        log.info(
            "event=started link=%s:%d enrol=%s:%d db=%s",
            self.config.bind, self.link_port, self.config.bind, self.enrol_port,
            self.store.location,
        )

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str, credentials: Any) -> int:
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if not port:
            raise OSError(f"cannot listen on {address}")
        return port

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (open streams get ``grace`` seconds), then close the store."""
        if self._config_watch is not None:
            self._config_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._config_watch
            self._config_watch = None
        if self.console is not None:
            await self.console.close()
            self.console = None
        if self._server is not None:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            # End the long-lived links ourselves so that sites learn why and reconnect later.
            for link in list(self._links.values()):
                self._offer(link, _Abort(grpc.StatusCode.UNAVAILABLE, "cloud shutting down"))
            await self._server.stop(grace)
            self._server = None
        self._worker.shutdown(wait=True)
        self.store.close()
        log.info("event=stopped")

    async def wait_closed(self) -> None:
        """Wait until the server stops serving."""
        if self._server is not None:
            await self._server.wait_for_termination()

    def _server_certificate(self) -> tuple[bytes, bytes]:
        """The TLS server certificate, issued again when missing, expiring or renamed."""
        tls = Path(self.config.data_dir) / "tls"
        cert_path, key_path = tls / "server.crt", tls / "server.key"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                names = {str(n.value) for n in alt}
            except x509.ExtensionNotFound:
                names = set()
            fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=30)
            ours = cert.issuer == self.ca.certificate.subject
            if fresh and ours and set(self.config.server_names) <= names:
                return cert_path.read_bytes(), key_path.read_bytes()
        cert_pem, key_pem = self.ca.issue_server_certificate(list(self.config.server_names))
        tls.mkdir(parents=True, exist_ok=True)
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.write_bytes(key_pem)
        cert_path.write_bytes(cert_pem)
        return cert_pem, key_pem

    # ------------------------------------------------------------ worker thread

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking store or disk call on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, function, *args)

    async def _is_revoked(self, serial: int) -> bool:
        return await self.run(self.store.is_revoked, serial)

    # ------------------------------------------------------------ console operations

    async def push_config(self, site_id: str, yaml: bytes) -> ConfigRecord:
        """Store the next signed config version of a site and send it down its live link.
        The version is above what the site reported running, so a change made on site through
        its API never makes the push look stale."""
        link = self._links.get(site_id)
        report = await self.run(read_site_report, self.config.data_dir, site_id)
        above = max(reported_config_version(report),
                    link.config_version if link is not None else 0)
        record = await self.run(functools.partial(
            self.store.add_config, site_id, yaml, self.ca.sign_config, self.clock(), above=above))
        link = self._links.get(site_id)
        if link is not None and record.version > link.config_version:
            link.config_version = record.version
            self._offer(link, _config_message(record))
        log.info("event=config_pushed site=%s version=%d live=%s", site_id, record.version,
                 link is not None)
        return record

    async def issue_token(self, site_id: str, ttl: float) -> str:
        """A one-time enrolment token for ``site_id``, valid ``ttl`` seconds."""
        token = make_token()
        now = self.clock()
        await self.run(self.store.add_token, site_id, token, now + ttl, now)
        return token

    async def request_backup(self, site_id: str, reason: str = "") -> bool:
        """Ask a linked site to upload a backup now; False when the site is not linked."""
        link = self._links.get(site_id)
        if link is None:
            return False
        request_id = f"{site_id}-{int(self.clock() * 1000)}"
        message = pb.CloudMessage(
            backup_request=pb.BackupRequest(request_id=request_id, reason=reason)
        )
        return self._offer(link, message)

    async def revoke(self, serial: int) -> bool:
        """Revoke a certificate and close any live link using it."""
        revoked = await self.run(self.store.revoke_certificate, serial, self.clock())
        for link in list(self._links.values()):
            if link.site.serial == serial:
                self._offer(link, _Abort(grpc.StatusCode.UNAUTHENTICATED, "certificate revoked"))
        return revoked

    async def site_reports(self) -> dict[str, dict[str, Any]]:
        """What each site said last: its Hello and its last ConfigApplied (see
        ``read_site_reports``)."""
        return await self.run(read_site_reports, self.config.data_dir)

    def linked_sites(self) -> list[str]:
        """Sites with a live SiteLink stream."""
        return sorted(self._links)

    def link_states(self) -> dict[str, LinkState]:
        """Every site whose link opened or closed since this process started."""
        return dict(self._link_states)

    async def site_views(self) -> list[SiteView]:
        """The console's rows: the store's view of every site plus the live link states."""
        links, now = self.link_states(), self.clock()
        return await self.run(lambda: site_views(self.store, links, now,
                                                 read_site_reports(self.config.data_dir)))

    async def _watch_configs(self) -> None:
        """Send linked sites the config versions stored by another process (push-config)."""
        while True:
            await asyncio.sleep(self.config.config_poll_s)
            if not self._links:
                continue
            try:
                versions = await self.run(self.store.config_versions)
                for site_id, version in versions.items():
                    link = self._links.get(site_id)
                    if link is None or version <= link.config_version:
                        continue
                    record = await self.run(self.store.latest_config, site_id)
                    # The link may have changed, or been sent the version, meanwhile.
                    if record is None or self._links.get(site_id) is not link:
                        continue
                    # A congested link is tried again at the next poll.
                    if record.version > link.config_version and self._offer(
                        link, _config_message(record)
                    ):
                        link.config_version = record.version
                        log.info("event=config_sent site=%s version=%d", site_id,
                                 record.version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a database hiccup must not end the watch
                log.warning("event=config_watch_failed error=%r", exc)

    @staticmethod
    def _offer(link: _Link, item: Any) -> bool:
        try:
            link.outbound.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("event=link_congested site=%s dropped=command", link.site.site_id)
            return False
        return True


def _ack(seq: int) -> Any:
    # Every Ack says that this cloud takes EventBatch and EventColumns messages.
    return pb.CloudMessage(ack=pb.Ack(seq=seq, batches=True, columns=True))


def _config_message(record: ConfigRecord) -> Any:
    return pb.CloudMessage(
        config=pb.ConfigVersion(
            version=record.version, yaml=record.yaml, signature=record.signature
        )
    )


# ---------------------------------------------------------------- services


class _EnrolmentServicer(pb_grpc.EnrolmentServicer):
    def __init__(self, cloud: CloudServer) -> None:
        self.cloud = cloud

    async def Enrol(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        cloud = self.cloud
        if not request.token or len(request.token) > MAX_TOKEN_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token missing or too long")
        if not request.csr_pem or len(request.csr_pem) > MAX_CSR_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"csr_pem missing or over {MAX_CSR_BYTES} bytes"
            )
        try:
            # Check the CSR before spending the token on it.
            cloud.ca.check_csr(request.csr_pem)
        except CertificateError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            site_id = await cloud.run(cloud.store.redeem_token, request.token, cloud.clock())
        except TokenRejected as exc:
            log.info("event=enrol_refused reason=%r peer=%s", exc.reason, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        issued = cloud.ca.issue_site_certificate(
            request.csr_pem, site_id, days=cloud.config.site_cert_days
        )
        await cloud.run(
            cloud.store.record_certificate, site_id, issued.serial,
            issued.not_after.timestamp(), cloud.clock(),
        )
        log.info("event=enrolled site=%s serial=%x not_after=%s", site_id, issued.serial,
                 issued.not_after.isoformat())
        return pb.EnrolResponse(
            site_id=site_id,
            certificate_pem=issued.pem,
            ca_certificate_pem=cloud.ca.certificate_pem,
            not_after=_timestamp(issued.not_after.timestamp()),
        )


class _BridgeServicer(pb_grpc.BridgeServicer):
    def __init__(self, cloud: CloudServer) -> None:
        self.cloud = cloud

    # ------------------------------------------------------------ SiteLink

    async def SiteLink(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        cloud = self.cloud
        site = current_site()
        link = _Link(site, heard_at=cloud.clock())
        previous = cloud._links.get(site.site_id)
        if previous is not None:
            cloud._offer(previous, _Abort(grpc.StatusCode.ABORTED, "replaced by a newer link"))
        cloud._links[site.site_id] = link
        cloud._link_states[site.site_id] = LinkState(True, cloud.clock())
        inbound: asyncio.Queue[Any] = asyncio.Queue(maxsize=cloud.config.ingest_batch * 2)
        tasks: list[asyncio.Task[None]] = []
        log.info("event=link_up site=%s peer=%s", site.site_id, context.peer())
        try:
            await cloud.run(cloud.store.touch_site, site.site_id, cloud.clock())
            acked = await cloud.run(cloud.store.acked_seq, site.site_id)
            newest = await cloud.run(cloud.store.newest_seq, site.site_id)
            # Versions stored before the link opened go down only to a site that says Hello
            # with an older one; the watcher sends the ones stored from now on.
            existing = await cloud.run(cloud.store.latest_config, site.site_id)
            link.config_version = max(link.config_version, existing.version if existing else 0)
            # Tell the site at once where to resume, before it sends anything.
            link.acked = acked
            first = _ack(acked)
            first.ack.newest_seq = newest
            await context.write(first)
            tasks.append(asyncio.create_task(self._read(request_iterator, inbound, link)))
            tasks.append(asyncio.create_task(self._ingest(inbound, link)))
            heartbeat = cloud.config.heartbeat_s
            while True:
                try:
                    item = await asyncio.wait_for(link.outbound.get(), heartbeat)
                except TimeoutError:
                    silent = cloud.clock() - link.heard_at
                    if silent > cloud.config.site_silence_s and not link.queued_bytes:
                        # The site answers every repeated Ack: it is behind a dead path.
                        log.warning("event=site_silent site=%s silent_s=%.0f", site.site_id,
                                    silent)
                        await context.abort(grpc.StatusCode.UNAVAILABLE,
                                            f"site silent for {silent:.0f} s")
                    # Quiet link: repeat the Ack so that the site can tell a live cloud from a
                    # silent path (sockets open, nothing forwarded).
                    item = _ack(link.acked)
                if item is _END:
                    return
                if isinstance(item, _Abort):
                    await context.abort(item.code, item.details)
                await context.write(item)
        finally:
            for task in tasks:
                task.cancel()
            if cloud._links.get(site.site_id) is link:
                del cloud._links[site.site_id]
                cloud._link_states[site.site_id] = LinkState(False, cloud.clock())
            log.info("event=link_down site=%s", site.site_id)

    async def _read(self, request_iterator: Any, inbound: asyncio.Queue[Any], link: _Link) -> None:
        """Validate what the site sends and queue it for ingest, in order."""
        cloud = self.cloud
        site_id = link.site.site_id
        try:
            async for message in request_iterator:
                link.heard_at = cloud.clock()
                body = message.WhichOneof("body")
                if body in ("events", "columns", "event"):
                    if body == "events":
                        batch, problem = _event_records(message.events.events, site_id)
                    elif body == "columns":
                        batch, problem = _event_columns(message.columns, site_id)
                    else:
                        batch, problem = _single_event(message.event, site_id)
                    if batch is not None:
                        size = _queued_size(batch)
                        while link.queued_bytes and link.queued_bytes + size > INGEST_QUEUE_BYTES:
                            link.drained.clear()
                            await link.drained.wait()
                        link.queued_bytes += size
                        await inbound.put(batch)
                    if problem is not None:
                        # What came before the bad event is stored and acknowledged first.
                        await inbound.put(problem)
                        return
                elif body == "hello":
                    hello = message.hello
                    if hello.site_id and hello.site_id != site_id:
                        await inbound.put(_Abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"hello for site {hello.site_id!r} on a certificate of {site_id!r}",
                        ))
                        return
                    await cloud.run(functools.partial(
                        record_site_report, cloud.config.data_dir, site_id,
                        hello={
                            "at": cloud.clock(), "agent_version": hello.agent_version,
                            "last_seq": hello.last_seq, "config_version": hello.config_version,
                            "last_backup_id": hello.last_backup_id or None,
                            "last_backup_at": _seconds(hello.last_backup_at)
                            if hello.HasField("last_backup_at") else None,
                        },
                    ))
                    log.info("event=hello site=%s last_seq=%d config_version=%d "
                             "last_backup=%s agent=%r", site_id, hello.last_seq,
                             hello.config_version, hello.last_backup_id or "-",
                             hello.agent_version)
                    latest = await cloud.run(cloud.store.latest_config, site_id)
                    if latest is not None and latest.version > hello.config_version:
                        link.config_version = max(link.config_version, latest.version)
                        await link.outbound.put(_config_message(latest))
                    else:
                        link.config_version = max(link.config_version, hello.config_version)
                elif body == "heartbeat":
                    pass  # heard: that is all it says
                elif body == "config_applied":
                    applied = message.config_applied
                    log.info("event=config_applied site=%s version=%d ok=%s error=%r", site_id,
                             applied.version, applied.ok, applied.error)
                    await cloud.run(functools.partial(
                        record_site_report, cloud.config.data_dir, site_id,
                        config_applied={"at": cloud.clock(), "version": applied.version,
                                        "ok": applied.ok, "error": applied.error[:2000]},
                    ))
                else:
                    await inbound.put(_Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty message"))
                    return
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, grpc.aio.AbortError):
            # The site went away, or the link was ended here; either way it ends.
            pass
        except Exception as exc:  # a bug or a full disk must end the link loudly, not hang it
            log.error("event=link_read_failed site=%s error=%r", site_id, exc)
            await inbound.put(_Abort(grpc.StatusCode.INTERNAL, "cloud error reading the link"))
            return
        await inbound.put(_END)

    async def _ingest(self, inbound: asyncio.Queue[Any], link: _Link) -> None:
        """Store events in batches, each followed by an Ack; pass a stop on to the writer.

        One transaction takes what is queued, up to ``ingest_batch`` events (a message is
        never split). While one batch is being stored, the next one already waits on the
        worker thread (``INGEST_DEPTH``): the worker goes from one commit straight to the next
        insert instead of waiting for this loop. The worker is one thread, so batches commit
        in order, and each Ack is sent once its batch (and every earlier one) committed.
        """
        cloud = self.cloud
        limit = cloud.config.ingest_batch
        loop = asyncio.get_running_loop()
        storing: collections.deque[asyncio.Future[int | None]] = collections.deque()
        stop: Any = None
        try:
            while True:
                # Queue batches on the worker: always one when nothing is being stored (waiting
                # for the link), more only while the link has messages ready.
                while stop is None and len(storing) < INGEST_DEPTH and (
                        not storing or not inbound.empty()):
                    parts, stop = await self._take(inbound, link, limit)
                    if parts:
                        storing.append(loop.run_in_executor(
                            cloud._worker, self._store_batch, link.site, _joined(parts)))
                if not storing:
                    break
                try:
                    acked = await storing.popleft()
                except Exception as exc:
                    # Nothing of the batch is acknowledged: the site sends it again later.
                    log.error("event=ingest_failed site=%s error=%r", link.site.site_id, exc)
                    await link.outbound.put(
                        _Abort(grpc.StatusCode.UNAVAILABLE, "cloud store unavailable")
                    )
                    return
                if acked is None:
                    await link.outbound.put(
                        _Abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate revoked")
                    )
                    return
                link.acked = acked
                await link.outbound.put(_ack(acked))
            await link.outbound.put(stop)
        finally:
            for future in storing:  # queued after a failure: they store or absorb, unacked
                future.cancel()

    @staticmethod
    async def _take(inbound: asyncio.Queue[Any], link: _Link, limit: int
                    ) -> tuple[list[EventColumns], Any]:
        """The next batch from the link (whole messages, up to ``limit`` events once at least
        one is taken), and the stop that followed it, if any."""
        parts: list[EventColumns] = []
        count = 0
        item = await inbound.get()
        while True:
            if not isinstance(item, EventColumns):
                return parts, item
            parts.append(item)
            count += len(item)
            link.queued_bytes -= _queued_size(item)
            link.drained.set()
            if count >= limit or inbound.empty():
                return parts, None
            item = inbound.get_nowait()

    def _store_batch(self, site: SiteCertificate, batch: EventColumns) -> int | None:
        """On the worker thread: refuse a revoked certificate, else ingest and return the ack."""
        store = self.cloud.store
        # A link outlives the check at its start: look again before every batch.
        if store.is_revoked(site.serial):
            return None
        result = store.ingest(batch, self.cloud.clock(), window=self.cloud.config.reorder_window)
        if result.refused:
            log.warning("event=events_refused site=%s count=%d reason=beyond_window ack=%d",
                        site.site_id, result.refused, result.acked_seq)
        log.debug("event=ingested site=%s stored=%d duplicates=%d ack=%d", site.site_id,
                  result.stored, result.duplicates, result.acked_seq)
        return result.acked_seq

    # ------------------------------------------------------------ backups

    async def UploadBackup(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        cloud = self.cloud
        site_id = current_site().site_id
        backup_id: str | None = None
        committed = 0
        try:
            async for chunk in request_iterator:
                if backup_id is None:
                    backup_id = check_backup_id(chunk.backup_id)
                elif chunk.backup_id and chunk.backup_id != backup_id:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "one backup per upload stream"
                    )
                if len(chunk.data) > CHUNK_LIMIT:
                    raise BackupError(
                        BackupError.TOO_LARGE,
                        f"chunk of {len(chunk.data)} bytes over the {CHUNK_LIMIT} limit",
                    )
                committed = await cloud.run(
                    cloud.backups.write_chunk, site_id, backup_id, chunk.offset, chunk.data
                )
                if chunk.final:
                    record = await cloud.run(
                        cloud.backups.finish, site_id, backup_id, chunk.sha256
                    )
                    log.info("event=backup_stored site=%s backup=%s size=%d", site_id,
                             backup_id, record.committed)
                    return pb.BackupReceipt(
                        backup_id=backup_id, committed=record.committed, complete=True,
                        sha256=record.sha256 or b"",
                    )
        except BackupError as exc:
            await _abort_backup(context, exc)
        if backup_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no chunk in the upload")
        return pb.BackupReceipt(backup_id=backup_id, committed=committed, complete=False)

    async def BackupStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        cloud = self.cloud
        site_id = current_site().site_id
        try:
            record = await cloud.run(cloud.backups.status, site_id, request.backup_id)
        except BackupError as exc:
            await _abort_backup(context, exc)
        state = pb.BackupStatusResponse
        if record is None:
            return state(backup_id=request.backup_id, state=state.ABSENT, committed=0)
        return state(
            backup_id=record.backup_id,
            state=state.COMPLETE if record.complete else state.PARTIAL,
            committed=record.committed,
            sha256=record.sha256 or b"",
            completed_at=_timestamp(record.completed_at) if record.completed_at else None,
        )

    async def ListBackups(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        cloud = self.cloud
        site_id = current_site().site_id
        records = await cloud.run(cloud.store.backups, site_id)
        return pb.ListBackupsResponse(
            backups=[
                pb.BackupInfo(backup_id=r.backup_id, size=r.committed, sha256=r.sha256 or b"",
                              completed_at=_timestamp(r.completed_at))
                for r in records if r.complete
            ]
        )

    async def Restore(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802
        cloud = self.cloud
        site_id = current_site().site_id
        try:
            record = await cloud.run(cloud.backups.status, site_id, request.backup_id)
            if record is None or not record.complete:
                raise BackupError(BackupError.NOT_FOUND, f"no complete backup {request.backup_id}")
            chunks = await cloud.run(cloud.backups.read, site_id, request.backup_id,
                                     request.offset)
        except BackupError as exc:
            await _abort_backup(context, exc)
        sha256 = record.sha256 or b""
        size = record.committed
        offset = request.offset
        try:
            while True:
                try:
                    piece = await asyncio.to_thread(next, chunks, None)
                except OSError as exc:  # e.g. removed by retention before the first read
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"backup unreadable: {exc}")
                if piece is None:
                    break
                offset, data = piece
                end = offset + len(data)
                last = end == size
                yield pb.BackupChunk(backup_id=record.backup_id, offset=offset, data=data,
                                     final=last, sha256=sha256 if last else b"")
                offset = end
        finally:
            # A cancelled read may still be running on its thread; then the file closes later.
            with contextlib.suppress(ValueError):
                chunks.close()
        if request.offset == size:
            # Nothing left to send (empty backup or offset at the end): still say it is final.
            yield pb.BackupChunk(backup_id=record.backup_id, offset=size, final=True,
                                 sha256=sha256)


_BACKUP_STATUS = {
    BackupError.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    BackupError.OFFSET: grpc.StatusCode.FAILED_PRECONDITION,
    BackupError.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    BackupError.DIGEST: grpc.StatusCode.DATA_LOSS,
    BackupError.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackupError.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
}


async def _abort_backup(context: grpc.aio.ServicerContext, exc: BackupError) -> None:
    if exc.committed is not None:
        # Lets a client resume without a BackupStatus round trip.
        context.set_trailing_metadata((("committed-offset", str(exc.committed)),))
    await context.abort(_BACKUP_STATUS[exc.kind], str(exc))


def _event_records(events: Any, site_id: str) -> tuple[EventColumns | None, _Abort | None]:
    """The events of an EventBatch up to its first bad one (None: none), and why that one is
    bad."""
    seqs: list[int] = []
    kinds: list[str] = []
    payloads: list[bytes] = []
    occurred: list[float] = []
    problem: _Abort | None = None
    for event in events:
        problem = _check_event(event, site_id)
        if problem is not None:
            break
        stamp = event.occurred_at
        seqs.append(event.seq)
        kinds.append(event.kind)
        payloads.append(event.payload)
        occurred.append(stamp.seconds + stamp.nanos / 1e9)
    else:
        if not seqs:
            problem = _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty event batch")
    if not seqs:
        return None, problem
    return EventColumns(site_id, seqs, kinds, payloads, occurred), problem


def _single_event(event: Any, site_id: str) -> tuple[EventColumns | None, _Abort | None]:
    """A lone Event as a batch of one, or why it is refused."""
    problem = _check_event(event, site_id)
    if problem is not None:
        return None, problem
    return EventColumns(site_id, [event.seq], [event.kind], [event.payload],
                        [_seconds(event.occurred_at)]), None


def _event_columns(message: Any, site_id: str) -> tuple[EventColumns | None, _Abort | None]:
    """The events of an EventColumns message up to its first bad one, and why that one is bad.

    Checked column by column in C (min, max, map) and event by event only when something is
    wrong, so a good batch costs no Python work per event.
    """
    if message.site_id != site_id:
        return None, _Abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"events of site {message.site_id!r} on a certificate of {site_id!r}",
        )
    seqs, kinds = list(message.seqs), list(message.kinds)
    payloads, occurred = list(message.payloads), list(message.occurred_at)
    count = len(seqs)
    if not count:
        return None, _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty event batch")
    if not len(kinds) == len(payloads) == len(occurred) == count:
        return None, _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "event columns of different lengths")
    kind_sizes = list(map(len, kinds))
    if (min(seqs) >= 1 and min(kind_sizes) >= 1 and max(kind_sizes) <= MAX_KIND_CHARS
            and max(map(len, payloads)) <= MAX_EVENT_PAYLOAD):
        return EventColumns(site_id, seqs, kinds, payloads, occurred), None
    for index in range(count):
        problem = _check_values(seqs[index], kinds[index], len(payloads[index]))
        if problem is not None:
            if not index:
                return None, problem
            return EventColumns(site_id, seqs[:index], kinds[:index], payloads[:index],
                                occurred[:index]), problem
    raise AssertionError("a column check failed but no event is bad")  # pragma: no cover


def _queued_size(batch: EventColumns) -> int:
    """Bytes a batch counts against ``INGEST_QUEUE_BYTES``: payloads and an envelope each."""
    return sum(map(len, batch.payloads)) + 64 * len(batch)


def _joined(parts: list[EventColumns]) -> EventColumns:
    """Batches of one link as one batch, in order."""
    if len(parts) == 1:
        return parts[0]
    return EventColumns(
        parts[0].site_id, [s for p in parts for s in p.seqs], [k for p in parts for k in p.kinds],
        [b for p in parts for b in p.payloads], [t for p in parts for t in p.occurred_at],
    )


def _check_event(event: Any, site_id: str) -> _Abort | None:
    """Why an event cannot be accepted, or None."""
    if event.site_id != site_id:
        return _Abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"event of site {event.site_id!r} on a certificate of {site_id!r}",
        )
    return _check_values(event.seq, event.kind, len(event.payload))


def _check_values(seq: int, kind: str, payload_bytes: int) -> _Abort | None:
    """Why an event with these fields cannot be accepted, or None (docs/cloud.md, limits)."""
    if seq < 1:
        return _Abort(grpc.StatusCode.INVALID_ARGUMENT, "event seq starts at 1")
    if not 1 <= len(kind) <= MAX_KIND_CHARS:
        return _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"event {seq}: kind must be 1 to {MAX_KIND_CHARS} characters",
        )
    if payload_bytes > MAX_EVENT_PAYLOAD:
        return _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"event {seq}: payload of {payload_bytes} bytes over {MAX_EVENT_PAYLOAD}",
        )
    return None
