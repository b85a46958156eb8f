"""The site configuration: ``site.yaml`` validated into frozen, typed objects.

``load_site(site_dir)`` reads ``site_dir/site.yaml`` and returns a :class:`SiteConfig`, or raises
:class:`ConfigError`. Every problem in the file is reported at once, each naming the file, the
key path (``sip.accounts[0].ha1_md5``), the line, and what is expected there. Unknown keys are
errors, so a typo never silently falls back to a default.

Paths in the file (TLS certificate and key, database, site key) are relative to the site
directory; the loaded objects hold them resolved to absolute paths.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

SITE_FILE = "site.yaml"

KeyPath = tuple[str | int, ...]


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigIssue:
    """One problem found in a configuration file."""

    file: str
    """The file the problem is in."""
    path: KeyPath
    """Key path of the offending value, ``()`` for the whole document."""
    line: int | None
    """1-based line of the key (or of the enclosing map when the key is missing)."""
    expected: str
    """What the file should hold there, in words."""

    @property
    def key(self) -> str:
        """The key path as written in messages: ``sip.accounts[0].user``."""
        return format_key_path(self.path)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.expected}"


class ConfigError(Exception):
    """The site configuration is missing or invalid; nothing was started or written."""

    def __init__(self, issues: list[ConfigIssue] | tuple[ConfigIssue, ...]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(
            sorted(issues, key=lambda i: (i.line if i.line is not None else 0, i.key))
        )
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.issues)
        head = f"invalid site configuration ({count} problem{'s' if count != 1 else ''}):"
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


class _KeyedValueError(ValueError):
    """A validator's complaint about a key below the model being validated."""

    def __init__(self, path: KeyPath, message: str) -> None:
        super().__init__(message)
        self.path = path


def format_key_path(path: KeyPath) -> str:
    """Render a key path as ``a.b[0].c``; the empty path is ``(document)``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


# --------------------------------------------------------------------------- field types


def _check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f"expected an IP address such as 127.0.0.1, 0.0.0.0 or ::, got {value!r}"
        ) from None


def _check_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(
            f"expected an address or CIDR network such as 192.0.2.10/32, got {value!r} ({exc})"
        ) from None


def parse_port_range(value: Any) -> tuple[int, int]:
    """``"LOW-HIGH"`` (or a ``(low, high)`` tuple from code) -> ``(LOW, HIGH)``.

    Raises ValueError saying what is expected otherwise.
    """
    bounds: tuple[Any, ...] = ()
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", value)
        if match:
            bounds = (int(match.group(1)), int(match.group(2)))
    elif isinstance(value, tuple):
        bounds = value
    if len(bounds) == 2 and all(type(b) is int for b in bounds):
        low, high = bounds
        if 1024 <= low < high <= 65535:
            return (low, high)
    raise ValueError(
        f"expected a port range 'LOW-HIGH' with 1024 <= LOW < HIGH <= 65535, got {value!r}"
    )


Port = Annotated[StrictInt, Field(ge=0, le=65535)]
Seconds = Annotated[StrictFloat, Field(gt=0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
IpAddress = Annotated[StrictStr, BeforeValidator(lambda v: _check_ip(v) if isinstance(v, str) else v)]
Cidr = Annotated[StrictStr, BeforeValidator(lambda v: _check_cidr(v) if isinstance(v, str) else v)]
PortRange = Annotated[tuple[int, int], BeforeValidator(parse_port_range)]


def _site_path(value: Any, info: ValidationInfo) -> Any:
    """Paths in site.yaml are relative to the site directory given in the validation context."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise ValueError("expected a file path (relative to the site directory)")
    path = Path(value)
    base = (info.context or {}).get("site_dir")
    if base is not None and not path.is_absolute():
        return Path(base) / path
    return path


# Defaults are validated too, so that default paths are resolved like written ones.
SitePath = Annotated[Path, BeforeValidator(_site_path), Field(validate_default=True)]


def _section() -> Any:
    """A section that may be left out; its defaults are validated with the same context."""
    return Field(default_factory=dict, validate_default=True)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- sections


class SiteInfo(_Model):
    """Who this site is."""

    id: Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] = "demo"
    """Short stable identifier; every event sent to the cloud carries it."""
    name: StrictStr = "Demo site"
    """Human readable name shown on consoles."""
    timezone: StrictStr = "UTC"
    """IANA time zone of the site, used for opening hours and reports."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"expected an IANA time zone such as UTC or Europe/Paris, got {value!r}"
            ) from None
        return value


class TlsFiles(_Model):
    """Certificate and private key of the SIP TLS listener (PEM)."""

    cert: SitePath = Path("tls/sip.crt")
    key: SitePath = Path("tls/sip.key")


class Timers(_Model):
    """RFC 3261 §17.1.1.1 timer base values, in seconds."""

    t1: Seconds = 0.5
    """Round-trip estimate (RFC 3261 default 500 ms)."""
    t2: Seconds = 4.0
    """Maximum retransmit interval for non-INVITE requests and INVITE responses."""
    t4: Seconds = 5.0
    """Maximum time a message stays in the network."""

    @model_validator(mode="after")
    def _ordered(self) -> Timers:
        if self.t2 < self.t1:
            raise _KeyedValueError(("t2",), f"expected t2 >= t1 ({self.t1}), got {self.t2}")
        return self


class RegistrarConfig(_Model):
    """REGISTER handling (RFC 3261 §10.3) and digest nonces."""

    min_expires: PositiveInt = 60
    """Shorter registrations are answered 423 Interval Too Brief."""
    max_expires: PositiveInt = 3600
    """Longer registrations are shortened to this."""
    default_expires: PositiveInt = 3600
    """Used when the REGISTER names no expiry."""
    nonce_ttl: Seconds = 300
    """Seconds a digest nonce stays valid; older ones get ``stale=true``."""

    @model_validator(mode="after")
    def _ordered(self) -> RegistrarConfig:
        if self.max_expires < self.min_expires:
            raise _KeyedValueError(
                ("max_expires",),
                f"expected max_expires >= min_expires ({self.min_expires}), "
                f"got {self.max_expires}",
            )
        if not self.min_expires <= self.default_expires <= self.max_expires:
            raise _KeyedValueError(
                ("default_expires",),
                f"expected default_expires between min_expires ({self.min_expires}) and "
                f"max_expires ({self.max_expires}), got {self.default_expires}",
            )
        return self


class SipLimits(_Model):
    """Size limits on what a peer may send; exceeding one is a clean error."""

    max_message_bytes: PositiveInt = 65535
    max_headers: PositiveInt = 100
    max_vias: PositiveInt = 70
    max_line_bytes: PositiveInt = 8192
    stream_buffer_bytes: PositiveInt = 262144
    """Per TCP/TLS connection receive buffer."""


SkillName = Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
SkillLevel = Annotated[StrictInt, Field(ge=1, le=10)]
"""A skill level: 1 (novice) to 10 (expert), as the ACD router takes it (docs/acd.md)."""


class Skill(_Model):
    """A skill agents have and queues may require (top-level ``skills:``)."""

    name: SkillName
    description: StrictStr | None = None


class Account(_Model):
    """A SIP account (an agent's phone). Only digest HA1 values are stored, never passwords."""

    user: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9._+-]{1,64}$")]
    """SIP user part, usually the extension ("1001")."""
    display_name: StrictStr | None = None
    ha1_md5: Annotated[StrictStr, Field(pattern=r"^[0-9a-fA-F]{32}$")]
    """``md5("user:realm:password")`` in hex (RFC 2617 §3.2.2.2)."""
    ha1_sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-fA-F]{64}$")]
    """``sha256("user:realm:password")`` in hex (RFC 7616 §3.4.2, RFC 8760)."""
    role: Literal["agent", "supervisor"] = "agent"
    """What the phone's user may do: dial rules per role, supervisor feature codes."""
    skills: dict[SkillName, SkillLevel] = Field(default_factory=dict)
    """Skill name (one of the site's ``skills``) -> level 1-10."""
    max_interactions: Annotated[StrictInt, Field(ge=1, le=10)] = 1
    """Interactions the router gives this agent at once (calls, ringing offers, reserved
    callbacks, calls outside the queues); above 1 the phone gets a second call waiting."""

    @field_validator("ha1_md5", "ha1_sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class SipConfig(_Model):
    """SIP listeners, realm, timers, limits and accounts."""

    bind: IpAddress = "127.0.0.1"
    """Address the SIP listeners bind to."""
    udp_port: Port = 5060
    tcp_port: Port = 5060
    tls_port: Port | None = 5061
    """``null`` disables TLS."""
    realm: Annotated[StrictStr, Field(pattern=r'^[^"\\\s]{1,128}$')] = "edgecc.local"
    """Digest realm (RFC 3261 §22.1)."""
    tls: TlsFiles = _section()
    timers: Timers = _section()
    registrar: RegistrarConfig = _section()
    limits: SipLimits = _section()
    accounts: tuple[Account, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> SipConfig:
        if self.tls_port and self.tls_port == self.tcp_port:
            raise _KeyedValueError(
                ("tls_port",), f"expected a port other than tcp_port ({self.tcp_port})"
            )
        seen: dict[str, int] = {}
        for index, account in enumerate(self.accounts):
            if account.user in seen:
                raise _KeyedValueError(
                    ("accounts", index, "user"),
                    f"expected a unique user, {account.user!r} is already "
                    f"accounts[{seen[account.user]}]",
                )
            seen[account.user] = index
        return self

    @property
    def accounts_by_user(self) -> dict[str, Account]:
        """The accounts keyed by SIP user."""
        return {account.user: account for account in self.accounts}


class GuardConfig(_Model):
    """Protection against scanners, brute force and floods."""

    enabled: StrictBool = True
    max_auth_failures: PositiveInt = 5
    """Failed digest attempts within ``failure_window`` before a source is banned."""
    failure_window: Seconds = 60
    ban_time: Seconds = 900
    rate_limit: Seconds = 50
    """Requests per second per source (token bucket refill rate)."""
    rate_burst: PositiveInt = 100
    """Token bucket size."""
    exempt_sources: tuple[Cidr, ...] = ()
    """Networks never rate-limited or banned (the SBC, load generators)."""
    scanner_user_agents: tuple[StrictStr, ...] = (
        "friendly-scanner", "sipvicious", "sipcli", "sipsak", "VaxSIPUserAgent", "iWar",
        "sip-scan", "SIVuS", "Gulp", "smap", "pplsip",
    )
    """User-Agent substrings (case-insensitive) whose requests are dropped unanswered."""


class CarrierAddress(_Model):
    """Where calls to the carrier (and its registration and keep-alive) are sent."""

    host: StrictStr
    """The carrier's SIP server: an IP address or a host name."""
    port: Port = 5060
    transport: Literal["UDP", "TCP", "TLS"] = "UDP"

    @field_validator("transport", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class TrunkAuth(_Model):
    """Digest credentials the carrier gave the site, kept as HA1 only (never the password)."""

    user: StrictStr
    realm: StrictStr
    """The carrier's digest realm (HA1 is bound to it)."""
    ha1_md5: Annotated[StrictStr, Field(pattern=r"^[0-9a-fA-F]{32}$")]
    """``md5("user:realm:password")`` in hex."""
    ha1_sha256: Annotated[StrictStr | None, Field(pattern=r"^[0-9a-fA-F]{64}$")] = None
    """``sha256("user:realm:password")`` in hex, when the carrier offers SHA-256."""


class TrunkConfig(_Model):
    """The carrier trunk."""

    allowed_sources: tuple[Cidr, ...] = ("127.0.0.1/32",)
    """Networks the carrier's INVITEs may come from (no digest for these)."""
    carrier: CarrierAddress | None = None
    """Where outbound calls go; None: the site has no outbound trunk."""
    auth: TrunkAuth | None = None
    """Credentials for the carrier's digest challenges (outbound INVITE, REGISTER)."""
    registration: StrictBool = Field(default=False, alias="register")
    """``register:`` in site.yaml. Register the site with ``carrier`` (RFC 3261 §10.2),
    answering its digest challenge with ``auth``; needs both."""
    register_expires: Annotated[StrictInt, Field(ge=60, le=86400)] = 600
    """Registration lifetime asked for, in seconds; refreshed before it ends."""
    options_interval: Annotated[float, Field(gt=0, le=3600)] | None = 30.0
    """Seconds between OPTIONS keep-alives to ``carrier``; null disables them."""
    options_failures: Annotated[StrictInt, Field(ge=1, le=100)] = 3
    """Keep-alives failed in a row before the trunk is reported down."""

    @model_validator(mode="after")
    def _registration_needs(self) -> TrunkConfig:
        if self.registration and (self.carrier is None or self.auth is None):
            raise _KeyedValueError(("register",), "expected carrier and auth with register: true")
        return self


class HttpConfig(_Model):
    """The appliance's HTTP API."""

    bind: IpAddress = "127.0.0.1"
    port: Port = 8080


class MediaConfig(_Model):
    """RTP media."""

    rtp_ports: PortRange = (20000, 29999)
    """UDP ports the media engine allocates RTP/RTCP pairs from (``"LOW-HIGH"``)."""
    rtp_timeout: Annotated[StrictFloat | StrictInt, Field(ge=0, le=3600)] = 30.0
    """Seconds without RTP on an answered leg before both sides are hung up (0: never)."""


class StorageConfig(_Model):
    """Files of the site."""

    database: SitePath = Path("edgecc.db")
    """The site's SQLite database."""
    site_key: SitePath = Path("site.key")
    """32 random bytes that wrap the per-recording encryption keys."""
    recordings: SitePath = Path("recordings")
    """Directory of the encrypted call recordings."""


def _flows_value(value: Any) -> Any:
    if isinstance(value, str | dict):
        return value
    raise ValueError(
        "expected a mapping of flow names to flows, or the name of a flow file, "
        f"got {_describe(value)}")


def _optional_site_path(value: Any, info: ValidationInfo) -> Any:
    return None if value is None else _site_path(value, info)


QUEUE_STRATEGIES = (
    "ring-all", "linear", "longest-idle", "fewest-calls", "least-talk-time",
    "round-robin-with-memory", "random", "weighted-random",
)
"""ACD strategies (docs/acd.md, "Strategies")."""

QueueName = Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class IvrCustomer(_Model):
    """A known caller in ``ivr.customers`` (docs/ivr.md, "Customer list")."""

    priority: Annotated[StrictInt, Field(ge=0, le=100)] = 0
    """Queue priority for this caller's calls (higher is served first)."""
    tier: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")] | None = None
    """Customer tier such as ``gold``, for the call record and screen pops."""


class IvrConfig(_Model):
    """IVR flows and which dialled number (DID) starts which flow (docs/ivr.md, docs/calls.md)."""

    customers: dict[
        Annotated[StrictStr, Field(pattern=r"^\+?[0-9]{2,32}$")], IvrCustomer] = Field(
        default_factory=dict, max_length=100_000)
    """Caller number (as in the From header's user part) -> priority and tier, consulted
    before any CRM look-up (a listed caller skips ``http`` nodes)."""
    lookup_concurrency: Annotated[StrictInt, Field(ge=1, le=256)] = 8
    """CRM look-ups (``http`` nodes) running at once on the site; more wait or fail."""

    flows: Annotated[StrictStr | dict[StrictStr, Any], BeforeValidator(_flows_value)] = Field(
        default_factory=dict)
    """The flows inline (a mapping of flow names to flows), or a flow file relative to the site
    directory. Checked whole when the appliance starts."""
    prompts: Annotated[Path | None, BeforeValidator(_optional_site_path)] = None
    """Directory of prompt WAV files (mono 16-bit, 8 or 16 kHz); None: the shipped prompts."""
    dids: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    """Dialled number (the user part of the trunk INVITE's Request-URI) -> flow name. A call to
    any other number is answered 404."""

    @field_validator("dids")
    @classmethod
    def _dial_strings(cls, value: dict[str, str]) -> dict[str, str]:
        for did in value:
            if not re.fullmatch(r"\+?[0-9A-Za-z._-]{1,64}", did):
                raise ValueError(f"expected a dialled number such as '+15550100', got {did!r}")
        return value


class RelaxStepSettings(_Model):
    """One step of skill relaxation (``queues[].relax``): once a caller has waited ``after``
    seconds, the queue's required levels are lowered and/or some skills dropped for them."""

    after: Seconds
    """Seconds of waiting, from the caller's place in the queue."""
    lower_by: Annotated[StrictInt, Field(ge=0, le=9)] = 0
    """Every still required minimum level is lowered by this much (never below 1)."""
    drop: tuple[SkillName, ...] = ()
    """Required skills no longer required at all."""


class QueueSettings(_Model):
    """One ACD queue (docs/acd.md)."""

    name: QueueName
    """Name used by IVR ``queue`` nodes and in queue events."""
    members: tuple[StrictStr, ...] = ()
    """Agents (SIP account users) who take this queue's calls, in member order."""
    strategy: StrictStr = "longest-idle"
    """How the agent is picked: one of QUEUE_STRATEGIES."""
    ring_timeout: Seconds = 15.0
    """Seconds an agent's phone rings before the call goes to the next agent."""
    wrap_up: Annotated[StrictFloat | StrictInt, Field(ge=0)] = 0.0
    """Seconds after a call before the agent is offered another."""
    max_wait: Seconds | None = None
    """Seconds a caller may wait; None: no limit."""
    record: StrictBool | StrictInt = True
    """Record the queue's answered calls (stereo, encrypted at rest): true, false, or the
    percentage of calls to record, drawn per call."""
    music: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = "hold_music"
    """Prompt the caller hears, looped, from joining the queue until an agent answers;
    None: silence."""
    announce_every: Seconds | None = None
    """Seconds between announcements of the waiting caller's position and estimated wait
    (between the music); None: no announcements."""
    callback_retries: Annotated[StrictInt, Field(ge=0, le=20)] = 2
    """Further dial attempts of a queued callback after its first attempt failed."""
    callback_retry_interval: Annotated[StrictFloat | StrictInt, Field(gt=0, le=86400)] = 300.0
    """Seconds between a failed callback attempt and the next one."""
    required_skills: dict[SkillName, SkillLevel] = Field(default_factory=dict)
    """Skill name (one of the site's ``skills``) -> the lowest level an agent needs to take
    this queue's callers."""
    relax: tuple[RelaxStepSettings, ...] = ()
    """Skill relaxation as a caller waits, steps in increasing ``after`` order; steps add up
    (docs/routing.md)."""
    max_length: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = None
    """Callers waiting beyond which a new caller overflows at once; None: no limit."""
    max_estimated_wait: Seconds | None = None
    """A new caller whose estimated wait is above this overflows at once; None: never."""
    join_empty: Literal["never", "unstaffed", "unavailable"] = "never"
    """A new caller overflows when no member is logged in (``unstaffed``) or none is logged in
    and unpaused (``unavailable``); ``never``: callers join whatever the staffing."""
    leave_empty: Literal["never", "unstaffed", "unavailable"] = "never"
    """Waiting callers overflow when the queue becomes empty in that sense."""
    overflow: QueueName | None = None
    """Queue an overflowing caller moves to (keeping their priority); None: the call ends
    with end reason ``overflow-<reason>``."""
    penalties: dict[StrictStr, Annotated[StrictInt, Field(ge=0, le=100)]] = Field(
        default_factory=dict)
    """Member -> penalty (default 0): members with a lower penalty are offered first, higher
    tiers only when every lower one is busy."""
    weights: dict[StrictStr, Annotated[StrictInt, Field(ge=1, le=1000)]] = Field(
        default_factory=dict)
    """Member -> weight (default 1): the share of calls under ``weighted-random``."""
    rejoin_window: Annotated[StrictFloat | StrictInt, Field(ge=0, le=86400)] = 0.0
    """Seconds within which a caller who hung up while waiting and calls again gets their old
    place back (0: off)."""

    @model_validator(mode="after")
    def _relax_steps(self) -> QueueSettings:
        previous = 0.0
        for index, step in enumerate(self.relax):
            if step.after <= previous and index:
                raise _KeyedValueError(("relax", index, "after"),
                                       f"expected more than the step before ({previous} s), "
                                       f"got {step.after}")
            previous = step.after
            for name in step.drop:
                if name not in self.required_skills:
                    raise _KeyedValueError(
                        ("relax", index, "drop"),
                        f"expected a skill this queue requires "
                        f"({', '.join(self.required_skills) or 'none'}), got {name!r}")
        return self

    @field_validator("record")
    @classmethod
    def _record_policy(cls, value: bool | int) -> bool | int:
        if not isinstance(value, bool) and not 0 <= value <= 100:
            raise ValueError(f"expected true, false or a percentage 0-100, got {value}")
        return value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in QUEUE_STRATEGIES:
            raise ValueError(f"expected one of {', '.join(QUEUE_STRATEGIES)}, got {value!r}")
        return value


FEATURE_CODE_ACTIONS = (
    "login", "logout", "pause", "unpause", "disposition", "listen", "whisper", "barge",
    "record-pause", "record-resume",
)
"""Actions a feature code may be given to (docs/routing.md, "Feature codes")."""

FeatureCodeDigits = Annotated[StrictStr, Field(pattern=r"^[0-9*#]{1,8}$")]
AgentCode = Annotated[StrictStr, Field(pattern=r"^[0-9]{1,16}$")]
AgentLabel = Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class AgentsConfig(_Model):
    """The agent desk: feature codes, pause reasons, dispositions, watchdog (docs/routing.md)."""

    feature_codes: dict[StrictStr, FeatureCodeDigits] = Field(default_factory=dict)
    """Action -> code, replacing the default (``*70`` login ... ``*1``/``*2`` recording)."""
    pause_reasons: dict[AgentCode, AgentLabel] = Field(
        default_factory=lambda: {"1": "break", "2": "lunch", "3": "training"})
    """Pause reason code (dialled after the pause code) -> reason name."""
    dispositions: dict[AgentCode, AgentLabel] = Field(
        default_factory=lambda: {"1": "resolved", "2": "follow-up", "3": "escalated"})
    """Disposition code (dialled after the disposition code) -> name."""
    watchdog_interval: Seconds = 30.0
    """Seconds between watchdog runs."""
    auto_pause_after: Annotated[StrictInt, Field(ge=0, le=100)] = 3
    """Offers in a row an agent lets ring out before being paused (reason ``auto-pause``);
    0: never."""
    watchdog_grace: Annotated[StrictFloat | StrictInt, Field(ge=0)] = 10.0
    """Seconds a ringing offer or call the router holds must stay unexplained by a live call
    before the watchdog clears it."""

    @field_validator("feature_codes")
    @classmethod
    def _known_actions(cls, value: dict[str, str]) -> dict[str, str]:
        for action in value:
            if action not in FEATURE_CODE_ACTIONS:
                raise ValueError(f"expected actions among {', '.join(FEATURE_CODE_ACTIONS)}, "
                                 f"got {action!r}")
        return value

    @model_validator(mode="after")
    def _distinct_codes(self) -> AgentsConfig:
        defaults = {"login": "*70", "logout": "*71", "pause": "*72", "unpause": "*73",
                    "disposition": "*74", "listen": "*80", "whisper": "*81", "barge": "*82",
                    "record-pause": "*1", "record-resume": "*2"}
        # Overridden codes last, so a clash is reported at the key the site set.
        codes = {**{a: c for a, c in defaults.items() if a not in self.feature_codes},
                 **self.feature_codes}
        seen: dict[str, str] = {}
        for action, code in codes.items():
            if code in seen:
                raise _KeyedValueError(
                    ("feature_codes", action),
                    f"expected a code of its own, {code!r} is also {seen[code]}")
            seen[code] = action
        if "auto-pause" in self.pause_reasons.values():
            raise _KeyedValueError(("pause_reasons",),
                                   "expected reason names other than auto-pause (the router's)")
        return self


DialPrefix = Annotated[StrictStr, Field(pattern=r"^(\+[0-9]{0,16}|[0-9]{1,16})$")]


class DialRole(_Model):
    """What the phones of one account role may dial through the trunk (docs/calls.md)."""

    allowed_prefixes: tuple[DialPrefix, ...] = ()
    """A dialled number must start with one of these; empty: any number."""
    international: StrictBool = False
    """May dial numbers whose longest matching prefix is an international one."""
    premium: StrictBool = False
    """May dial numbers starting with a premium-rate prefix."""
    max_calls: Annotated[StrictInt, Field(ge=0, le=100)] = 2
    """Outbound calls one phone of this role may have up at once; beyond it: 486."""
    record: StrictBool = True
    """Record this role's outbound calls (stereo, encrypted at rest)."""


class DiallingConfig(_Model):
    """Dial rules for calls agents and supervisors place through ``trunk.carrier``."""

    international_prefixes: tuple[DialPrefix, ...] = ("00", "011", "+")
    """A number whose longest matching prefix (with ``national_prefixes``) is one of these is
    international."""
    national_prefixes: tuple[DialPrefix, ...] = ("+1",)
    """Prefixes that are not international even though a shorter international one matches."""
    premium_prefixes: tuple[DialPrefix, ...] = ("1900", "+1900", "1976", "+1976")
    """Premium-rate numbers start with one of these."""
    roles: dict[Literal["agent", "supervisor"], DialRole] = Field(
        default_factory=lambda: {"agent": DialRole(),
                                 "supervisor": DialRole(international=True, max_calls=4)})
    """Account role -> its rules; a role not listed may not dial out."""


ClearAfter = Annotated[StrictFloat | StrictInt, Field(ge=0)]
"""Seconds an alert's rule must stay back to normal before it clears (0: at once)."""


class ServiceLevelAlert(_Model):
    """Alert when a queue's service level over a sliding window is below target."""

    target: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.8
    """Fraction of callers answered within ``threshold``."""
    threshold: Seconds = 20.0
    """Answered within this many seconds counts as in time."""
    window: Seconds = 1800.0
    """Callers who left the queue within this many seconds count."""
    min_calls: PositiveInt = 10
    """Fewer callers than this in the window raise nothing."""
    clear_above: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    """Back to normal at or above this level (null: target + 0.05, at most 1)."""
    clear_after: ClearAfter = 30.0
    """Seconds back to normal before the alert clears (docs/alerts.md, "Hysteresis")."""

    @model_validator(mode="after")
    def _clear_band(self) -> ServiceLevelAlert:
        if self.clear_above is not None and self.clear_above < self.target:
            raise _KeyedValueError(("clear_above",), f"expected clear_above >= target "
                                   f"({self.target}), got {self.clear_above}")
        return self


class CountAlert(_Model):
    """Alert above a count."""

    above: Annotated[StrictInt, Field(ge=0)] = 10
    clear_below: PositiveInt | None = None
    """Back to normal below this count (null: 80 % of ``above``, at least 1)."""
    clear_after: ClearAfter = 30.0
    """Seconds back to normal before the alert clears."""

    @model_validator(mode="after")
    def _clear_band(self) -> CountAlert:
        if self.clear_below is not None and self.clear_below > self.above + 1:
            raise _KeyedValueError(("clear_below",), f"expected clear_below <= above + 1 "
                                   f"({self.above + 1}), got {self.clear_below}")
        return self


class DurationAlert(_Model):
    """Alert above a duration, seconds."""

    above: Seconds = 120.0


class WaitAlert(DurationAlert):
    """Alert on the longest wait of a queue, seconds."""

    clear_below: Seconds | None = None
    """Back to normal under this wait (null: 80 % of ``above``)."""
    clear_after: ClearAfter = 30.0
    """Seconds back to normal before the alert clears."""

    @model_validator(mode="after")
    def _clear_band(self) -> WaitAlert:
        if self.clear_below is not None and self.clear_below > self.above:
            raise _KeyedValueError(("clear_below",), f"expected clear_below <= above "
                                   f"({self.above}), got {self.clear_below}")
        return self


class PauseAlert(DurationAlert):
    """Alert on an agent paused too long, seconds."""

    above: Seconds = 900.0
    clear_after: ClearAfter = 30.0
    """Seconds unpaused before the alert clears; a pause again within them continues."""


class LinkDownAlert(_Model):
    """Alert when the cloud link has been offline this long."""

    after: Seconds = 60.0
    clear_after: ClearAfter = 30.0
    """Seconds back online before the alert clears; offline again within them continues."""


class SecurityAlert(_Model):
    """Alert on a burst of SIP bans and refused API logins."""

    count: PositiveInt = 5
    window: Seconds = 300.0
    clear_below: PositiveInt | None = None
    """Back to normal with fewer events in the window (null: half of ``count``, at least 1)."""
    clear_after: ClearAfter = 30.0
    """Seconds back to normal before the alert clears."""

    @model_validator(mode="after")
    def _clear_band(self) -> SecurityAlert:
        if self.clear_below is not None and self.clear_below > self.count:
            raise _KeyedValueError(("clear_below",), f"expected clear_below <= count "
                                   f"({self.count}), got {self.clear_below}")
        return self


class AlertsConfig(_Model):
    """Alert rules (docs/alerts.md); ``null`` turns a rule off."""

    service_level: ServiceLevelAlert | None = Field(default_factory=ServiceLevelAlert)
    calls_waiting: CountAlert | None = Field(default_factory=CountAlert)
    """Callers waiting in one queue."""
    longest_wait: WaitAlert | None = Field(default_factory=WaitAlert)
    """Seconds the longest-waiting caller of a queue has waited."""
    agent_paused: PauseAlert | None = Field(default_factory=PauseAlert)
    """Seconds an agent has been paused."""
    long_call: DurationAlert | None = Field(default_factory=lambda: DurationAlert(above=3600.0))
    """Seconds a call has lasted."""
    link_down: LinkDownAlert | None = Field(default_factory=LinkDownAlert)
    security: SecurityAlert | None = Field(default_factory=SecurityAlert)


class WebhookTarget(_Model):
    """One URL events are POSTed to (docs/alerts.md, "Webhooks")."""

    url: Annotated[StrictStr, Field(pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$")]
    """http:// or https:// URL of the receiver."""
    secret_file: Annotated[Path | None, BeforeValidator(_optional_site_path)] = None
    """File holding the HMAC-SHA256 key that signs each request (never the key itself)."""
    kinds: tuple[StrictStr, ...] = ("alert.raised", "alert.cleared", "screen.pop")
    """Event kinds sent to this URL."""
    timeout: Seconds = 2.0
    retries: Annotated[StrictInt, Field(ge=0, le=20)] = 5
    backoff: Seconds = 0.5
    """First retry delay, seconds; doubled on each retry."""
    queue_limit: PositiveInt = 10000
    """Events held for this URL at most; more are dropped and counted."""


class SiteConfig(_Model):
    """Everything ``site.yaml`` says, validated."""

    site: SiteInfo = _section()
    sip: SipConfig = _section()
    guard: GuardConfig = _section()
    trunk: TrunkConfig = _section()
    http: HttpConfig = _section()
    media: MediaConfig = _section()
    storage: StorageConfig = _section()
    ivr: IvrConfig = _section()
    queues: tuple[QueueSettings, ...] = ()
    agents: AgentsConfig = _section()
    dialling: DiallingConfig = _section()
    alerts: AlertsConfig = _section()
    webhooks: tuple[WebhookTarget, ...] = ()
    skills: tuple[Skill, ...] = ()
    """Skills agents have (``sip.accounts[].skills``) and queues require (``required_skills``)."""

    _site_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> SiteConfig:
        base = (info.context or {}).get("site_dir")
        if base is not None:
            self._site_dir = Path(base)
        low, high = self.media.rtp_ports
        for key in ("udp_port", "tcp_port", "tls_port"):
            port = getattr(self.sip, key)
            if port and low <= port <= high:
                raise _KeyedValueError(
                    ("sip", key),
                    f"expected a port outside media.rtp_ports ({low}-{high}), got {port}",
                )
        if self.http.port and self.http.port in (self.sip.tcp_port, self.sip.tls_port):
            raise _KeyedValueError(
                ("http", "port"), f"expected a port not used by SIP TCP/TLS, got {self.http.port}"
            )
        users = self.sip.accounts_by_user
        names: dict[str, int] = {}
        for index, queue in enumerate(self.queues):
            if queue.name in names:
                raise _KeyedValueError(
                    ("queues", index, "name"),
                    f"expected a unique queue name, {queue.name!r} is already "
                    f"queues[{names[queue.name]}]",
                )
            names[queue.name] = index
            for position, member in enumerate(queue.members):
                if member not in users:
                    raise _KeyedValueError(
                        ("queues", index, "members", position),
                        f"expected the user of a sip.accounts entry, got {member!r}",
                    )
            for key in ("penalties", "weights"):
                for member in getattr(queue, key):
                    if member not in queue.members:
                        raise _KeyedValueError(
                            ("queues", index, key, member),
                            f"expected a member of this queue "
                            f"({', '.join(queue.members) or 'none'}), got {member!r}")
            if len(set(queue.members)) != len(queue.members):
                raise _KeyedValueError(
                    ("queues", index, "members"), "expected each agent once per queue"
                )
        for index, queue in enumerate(self.queues):
            if queue.overflow is not None and (queue.overflow not in names
                                               or queue.overflow == queue.name):
                others = ", ".join(n for n in names if n != queue.name) or "none"
                raise _KeyedValueError(("queues", index, "overflow"),
                                       f"expected another queue's name ({others}), "
                                       f"got {queue.overflow!r}")
        self._check_skills()
        return self

    def _check_skills(self) -> None:
        """Every skill an account has or a queue requires is one of ``skills``, named once."""
        known: dict[str, int] = {}
        for index, skill in enumerate(self.skills):
            if skill.name in known:
                raise _KeyedValueError(
                    ("skills", index, "name"),
                    f"expected a unique skill name, {skill.name!r} is already "
                    f"skills[{known[skill.name]}]")
            known[skill.name] = index
        listed = ", ".join(known) or "none"
        for where, items in (("sip", self.sip.accounts), ("queues", self.queues)):
            for index, item in enumerate(items):
                key = "skills" if where == "sip" else "required_skills"
                for name in getattr(item, key):
                    if name not in known:
                        path = (("sip", "accounts", index, key, name) if where == "sip"
                                else ("queues", index, key, name))
                        raise _KeyedValueError(
                            path, f"expected a skill listed in skills ({listed}), got {name!r}")

    @property
    def site_dir(self) -> Path | None:
        """The directory this configuration was loaded from (None when built in code)."""
        return self._site_dir


# --------------------------------------------------------------------------- YAML with lines


class _LineMap:
    """Key path -> 1-based line, built from the composed YAML node tree."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[KeyPath, int] = {}
        self.duplicates: list[tuple[KeyPath, int]] = []
        if root is not None:
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: KeyPath) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._walk(value_node, path)
                    continue
                key: str | int = str(key_node.value)
                child = (*path, key)
                line = key_node.start_mark.line + 1
                if child in self.lines and isinstance(key_node, yaml.ScalarNode):
                    self.duplicates.append((child, line))
                self.lines[child] = line
                self._walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*path, index))

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the deepest existing prefix of ``path`` (a missing key -> its parent)."""
        for end in range(len(path), -1, -1):
            prefix = tuple(str(p) if not isinstance(p, int) else p for p in path[:end])
            if prefix in self.lines:
                return self.lines[prefix]
        return None


def _compose(text: str, file: str) -> tuple[Any, _LineMap]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = str(exc.problem or "")
        if exc.context:
            start = f" (from line {exc.context_mark.line + 1})" if exc.context_mark else ""
            what = f"{exc.context}{start}: {what}"
        raise ConfigError(
            [ConfigIssue(file, (), line, f"malformed YAML: {what}")]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(file, (), None, f"malformed YAML: {exc}")]) from None
    finally:
        loader.dispose()
    return data, _LineMap(node)


# --------------------------------------------------------------------------- error wording

_SECRET_HINTS = ("ha1", "password", "secret")
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_PATTERN_HINTS = {
    "id": "a short id of lower-case letters, digits, '-' and '_' (up to 63, not starting "
    "with '-' or '_')",
    "user": "a SIP user name of letters, digits, '.', '_', '+' and '-' (up to 64)",
    "realm": "a realm without spaces, quotes or backslashes (up to 128 characters)",
}
_SIMPLE = {
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
}


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``path``, if any."""
    model: Any = SiteConfig
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _unwrap_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _expected(error: Mapping[str, Any], path: KeyPath) -> str:
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        model = _model_at(path[:-1])
        allowed = ", ".join(model.model_fields) if model is not None else ""
        return f"unknown key (allowed here: {allowed})" if allowed else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping (key: value), got {_describe(value)}"
    if kind in ("tuple_type", "list_type"):
        return f"expected a list, got {_describe(value)}"
    if kind == "string_type":
        hint = " (quote it: \"...\")" if isinstance(value, int | float) else ""
        return f"expected a string{hint}, got {_describe(value)}"
    if kind == "string_pattern_mismatch" and path and str(path[-1]).startswith("ha1_"):
        size = 32 if path[-1] == "ha1_md5" else 64
        return f"expected {size} hexadecimal digits"
    if kind == "string_pattern_mismatch" and path and str(path[-1]) in _PATTERN_HINTS:
        return f"expected {_PATTERN_HINTS[str(path[-1])]}, got {_describe(value)}"
    ctx = error.get("ctx") or {}
    last = str(path[-1]) if path else ""
    if last.endswith("port") and kind in ("int_type", "greater_than_equal", "less_than_equal"):
        return f"expected a port number from 0 to 65535 (0 = any free port), got {_describe(value)}"
    if kind in _BOUNDS:
        bound = next(ctx[k] for k in ("ge", "gt", "le", "lt") if k in ctx)
        return f"expected a number {_BOUNDS[kind]} {bound}, got {_describe(value)}"
    if kind in _SIMPLE:
        return f"expected {_SIMPLE[kind]}, got {_describe(value)}"
    message = str(error.get("msg", ""))
    if isinstance(ctx.get("error"), ValueError):
        message = str(ctx["error"])
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    elif message.startswith("Input should be "):
        message = "expected " + message[len("Input should be ") :]
    elif message.startswith("String should match pattern "):
        message = "expected a value matching " + message[len("String should match pattern ") :]
    if not message.startswith("expected"):
        return message
    secret = any(h in str(p) for p in path for h in _SECRET_HINTS)
    if secret or isinstance(value, dict | list) or "got " in message:
        return message
    return f"{message}, got {_describe(value)}"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    return repr(value)


def _issues(exc: ValidationError, file: str, lines: _LineMap) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        path: KeyPath = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        if isinstance(ctx.get("error"), _KeyedValueError):
            path = (*path, *ctx["error"].path)
        # pydantic adds the tagged union member / function name for some validators.
        path = tuple(p for p in path if not (isinstance(p, str) and p.startswith("function-")))
        issues.append(ConfigIssue(file, path, lines.line_of(path), _expected(error, path)))
    return issues


# --------------------------------------------------------------------------- loading


def parse_site_yaml(
    text: str, *, file: str = SITE_FILE, site_dir: Path | str | None = None
) -> SiteConfig:
    """Validate the text of a site.yaml; relative paths resolve against ``site_dir``."""
    data, lines = _compose(text, file)
    issues = [
        ConfigIssue(file, path, line, "duplicate key (each key may appear once)")
        for path, line in lines.duplicates
    ]
    if data is None:
        data = {}
    context = {"site_dir": Path(site_dir).resolve()} if site_dir is not None else None
    try:
        config = SiteConfig.model_validate(data, context=context)
    except ValidationError as exc:
        issues.extend(_issues(exc, file, lines))
        raise ConfigError(issues) from None
    if issues:
        raise ConfigError(issues)
    if site_dir is not None and config.sip.tls_port is not None:
        for key in ("cert", "key"):
            target = getattr(config.sip.tls, key)
            if not target.is_file():
                path = ("sip", "tls", key)
                issues.append(
                    ConfigIssue(
                        file, path, lines.line_of(path),
                        f"expected an existing PEM file, {target} does not exist "
                        "(or set sip.tls_port: null to disable TLS)",
                    )
                )
    if issues:
        raise ConfigError(issues)
    return config


def load_site(site_dir: Path | str) -> SiteConfig:
    """Read and validate ``site_dir/site.yaml``; raise ConfigError without touching anything."""
    directory = Path(site_dir)
    file = directory / SITE_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [ConfigIssue(str(file), (), None,
                         f"file not found; create a site with `edgecc init --site-dir {directory}`")]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(str(file), (), None, f"cannot read: {exc}")]) from None
    return parse_site_yaml(text, file=str(file), site_dir=directory)


def ha1(user: str, realm: str, password: str) -> tuple[str, str]:
    """The (MD5, SHA-256) digest HA1 values for an account (RFC 7616 §3.4.2)."""
    material = f"{user}:{realm}:{password}".encode()
    return hashlib.md5(material).hexdigest(), hashlib.sha256(material).hexdigest()
