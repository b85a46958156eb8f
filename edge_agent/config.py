"""The edge agent's configuration: the site's id and database, and the ``cloud`` section.

The link settings live in ``SITE_DIR/cloud.yaml`` (a file of its own, so ``site.yaml``'s schema
does not change)::

    cloud:
      address: cloud.example.com:50051   # the cloud's link port (mutual TLS)
      ca_cert: cloud/ca.crt              # paths are relative to the site directory
      certificate: cloud/site.crt
      key: cloud/site.key
      outbox_quota_bytes: 268435456
    backup:                              # optional (docs/backups.md)
      interval_s: 86400                  # 0: only when the cloud asks

Only ``address`` is required; every other key has a default (see ``CloudSection``). The site's
id and database path are read from ``site.yaml`` (``site.id``, ``storage.database``) without
the appliance's full validation, so the agent runs whatever the state of the SIP settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.link_state import stale_after_s

CLOUD_FILE = "cloud.yaml"
SITE_FILE = "site.yaml"
DEFAULT_DATABASE = "edgecc.db"
DEFAULT_SITE_ID = "demo"


class EdgeConfigError(Exception):
    """The site's files do not make a usable edge agent configuration; nothing was changed."""


class Reconnect(BaseModel):
    """gRPC connection backoff (gRPC's connection-backoff.md: exponential with jitter)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    initial_ms: int = Field(default=1000, ge=50, le=60_000)
    """First retry delay."""
    max_ms: int = Field(default=60_000, ge=100, le=60_000)
    """Cap on the delay between attempts (at most 60 s: a link back is used within a minute)."""


class Keepalive(BaseModel):
    """HTTP/2 keepalive pings on the link, so a dead path is noticed within time + timeout."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    time_ms: int = Field(default=30_000, ge=10_000)
    """Ping after this long without activity (the cloud refuses pings more often than 10 s)."""
    timeout_ms: int = Field(default=10_000, ge=1000)
    """The link is dead when a ping is not answered within this."""


class CloudSection(BaseModel):
    """The ``cloud`` section of ``cloud.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str = Field(pattern=r"^\S+:\d{1,5}$")
    """HOST:PORT of the cloud's link port."""
    server_name: str | None = None
    """Name to check in the cloud's certificate when it differs from HOST."""
    ca_cert: str = "cloud/ca.crt"
    """The cloud CA certificate (written at enrolment)."""
    certificate: str = "cloud/site.crt"
    """The site's certificate (written at enrolment)."""
    key: str = "cloud/site.key"
    """The site's private key (mode 0600, written at enrolment)."""
    database: str | None = None
    """Site database; default: ``storage.database`` of site.yaml."""
    outbox_quota_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Payload bytes the outbox may hold before droppable kinds are given up."""
    degraded_after_s: float = Field(default=60.0, gt=0)
    """Linked, but the oldest unacknowledged event is older than this: degraded."""
    offline_after_s: float = Field(default=30.0, gt=0)
    """Link lost for this long: offline (degraded before)."""
    reconnect: Reconnect = Reconnect()
    keepalive: Keepalive = Keepalive()
    batch: int = Field(default=500, ge=1, le=5000)
    """Events read from the database at a time, and sent in one message at most."""
    max_in_flight: int = Field(default=50_000, ge=1, le=100_000)
    """Events sent but not acknowledged at most (well inside the cloud's reorder window)."""
    window_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    """Payload bytes sent but not acknowledged at most (the cloud reads 16 MiB ahead)."""
    silence_s: float = Field(default=15.0, ge=1, le=600)
    """No message from the cloud for this long while it owes one (events in flight, or the
    Hello unanswered): the stream is ended, the link counted lost since the cloud was last
    heard, and a new stream opened with backoff. The cloud repeats its Ack every few seconds."""
    poll_interval_s: float = Field(default=0.25, gt=0, le=10)
    """How often the outbox is looked at for new events."""
    state_interval_s: float = Field(default=1.0, gt=0, le=60)
    """How often link_state is written (and on every change of state)."""
    stream_deadline_s: float = Field(default=3600.0, ge=1, le=86_400)
    """Deadline of one SiteLink stream (every call has one): a stream that reaches it is
    opened again at once from the last ack, the link still counted up."""


class BackupSection(BaseModel):
    """The ``backup`` section of ``cloud.yaml`` (docs/backups.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    interval_s: float = Field(default=86_400.0, ge=0)
    """Time from one confirmed backup to the next; 0 backs up only when the cloud asks."""
    chunk_bytes: int = Field(default=1024 * 1024, ge=4096, le=1024 * 1024)
    """Data per upload chunk (the bridge's limit is 1 MiB): the most a cut upload re-sends."""
    poll_s: float = Field(default=1.0, gt=0, le=60)
    """How often the worker looks at the schedule when nothing is asked."""
    first_after_s: float = Field(default=300.0, ge=0)
    """A site without any confirmed backup makes its first this long after the agent starts."""
    retry_after_s: float = Field(default=300.0, gt=0)
    """A scheduled backup that failed is tried again after this (doubling, up to interval_s)."""


@dataclass(frozen=True)
class EdgeConfig:
    """Everything the edge agent needs, paths resolved."""

    site_dir: Path
    site_id: str
    database: Path
    cloud: CloudSection
    ca_cert: Path
    certificate: Path
    key: Path
    backup: BackupSection = BackupSection()


def read_site(site_dir: Path) -> tuple[str, Path]:
    """(site id, database path) from ``site.yaml``; EdgeConfigError when unreadable."""
    data = _load_yaml(site_dir / SITE_FILE)
    site = data.get("site") or {}
    storage = data.get("storage") or {}
    if not isinstance(site, dict) or not isinstance(storage, dict):
        raise EdgeConfigError(f"{site_dir / SITE_FILE}: 'site' and 'storage' must be mappings")
    site_id = site.get("id", DEFAULT_SITE_ID)
    database = storage.get("database", DEFAULT_DATABASE)
    if not isinstance(site_id, str) or not site_id:
        raise EdgeConfigError(f"{site_dir / SITE_FILE}: site.id: expected a site id string")
    if not isinstance(database, str) or not database:
        raise EdgeConfigError(f"{site_dir / SITE_FILE}: storage.database: expected a path")
    return site_id, _resolve(site_dir, database)


def load_edge_config(site_dir: Path | str) -> EdgeConfig:
    """Read ``site.yaml`` and ``cloud.yaml`` of a site; raise EdgeConfigError naming the key."""
    directory = Path(site_dir)
    site_id, database = read_site(directory)
    file = directory / CLOUD_FILE
    if not file.exists():
        raise EdgeConfigError(
            f"{file}: not found; enrol the site first: `edgecc edge-agent enrol --site-dir "
            f"{directory} --cloud HOST:PORT --token TOKEN --ca-cert FILE`"
        )
    data = _load_yaml(file)
    unknown = set(data) - {"cloud", "backup"}
    if unknown:
        raise EdgeConfigError(
            f"{file}: unknown top-level keys {sorted(unknown)}; expected 'cloud' and 'backup'"
        )
    try:
        section = CloudSection.model_validate(data.get("cloud") or {})
        backup = BackupSection.model_validate(data.get("backup") or {})
    except ValidationError as exc:
        name = "cloud" if "CloudSection" in exc.title else "backup"
        problems = "; ".join(
            f"{name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise EdgeConfigError(f"{file}: {problems}") from None
    return EdgeConfig(
        site_dir=directory,
        site_id=site_id,
        database=_resolve(directory, section.database) if section.database else database,
        cloud=section,
        ca_cert=_resolve(directory, section.ca_cert),
        certificate=_resolve(directory, section.certificate),
        key=_resolve(directory, section.key),
        backup=backup,
    )


def link_report_stale_after_s(site_dir: Path | str | None) -> float:
    """How old the site's link-state row may grow before the edge agent counts as gone: from
    ``cloud.state_interval_s`` of ``cloud.yaml`` (its default when the site is not enrolled or
    the file cannot be read; the agent refuses such a file anyway)."""
    interval = CloudSection.model_fields["state_interval_s"].default
    if site_dir is not None:
        try:
            data = _load_yaml(Path(site_dir) / CLOUD_FILE).get("cloud") or {}
            value = data.get("state_interval_s", interval) if isinstance(data, dict) else interval
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                interval = float(value)
        except EdgeConfigError:
            pass
    return stale_after_s(interval)


def _resolve(site_dir: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else site_dir / candidate


def _load_yaml(file: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeConfigError(f"{file}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeConfigError(f"{file}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise EdgeConfigError(f"{file}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EdgeConfigError(f"{file}: expected a mapping at the top level")
    return data
