"""``edgecc doctor``: checks that a site can run, and says how to fix what is wrong.

Checks, in order: configuration, site directory, file permissions, ports, disk, TLS
certificate, database, carrier trunk (as the running appliance last recorded it), clock. Nothing is changed: ports are bound and released at once, the
database is opened read-only, and the probe file that proves the site directory writable is
removed. Findings at level WARN or FAIL are problems (exit status 1); INFO is reported only
(for instance when NTP state cannot be read on this system).
"""

from __future__ import annotations

import datetime as dt
import enum
import errno
import shutil
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
import zoneinfo
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.config import SITE_FILE, ConfigError, SiteConfig, load_site
from appliance.site_init import DEMO_CREDENTIALS, INITIAL_CREDENTIALS, SITE_KEY_BYTES

MIN_FREE_BYTES = 1 << 30
CERT_WARN_DAYS = 30
RTP_SAMPLE = 8
CLOCK_JUMP_S = 2.0
EARLIEST_SANE_TIME = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


class Level(enum.Enum):
    """How bad a finding is."""

    OK = "ok"
    INFO = "info"
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def is_problem(self) -> bool:
        """True for findings that make doctor exit 1."""
        return self in (Level.WARN, Level.FAIL)


@dataclass(frozen=True)
class Finding:
    """One result of one check."""

    level: Level
    """OK, INFO, WARN or FAIL."""
    check: str
    """Which check: config, site-dir, permissions, ports, disk, clock, tls, database, trunk."""
    message: str
    """What was found."""
    fix: str = ""
    """How to fix it (problems only)."""


@dataclass(frozen=True)
class ClockSample:
    """Wall and monotonic clock read together."""

    wall: float
    """time.time()"""
    mono: float
    """time.monotonic()"""

    @classmethod
    def now(cls) -> ClockSample:
        """Read both clocks."""
        return cls(time.time(), time.monotonic())


def run_checks(site_dir: Path | str) -> list[Finding]:
    """Run every check against ``site_dir`` and return the findings in order."""
    directory = Path(site_dir)
    started = ClockSample.now()
    findings: list[Finding] = []
    config = _check_config(directory, findings)
    findings += _check_site_dir(directory)
    findings += _check_permissions(directory, config)
    if config is not None:
        findings += _check_ports(config)
    findings += _check_disk(directory)
    if config is not None:
        findings += check_tls(config)
        findings += _check_database(config)
        findings += check_trunk(config)
    findings += check_clock(config, started)
    return findings


def format_findings(findings: Iterable[Finding], site_dir: Path | str) -> str:
    """The doctor report: one line per finding, a fix line under each problem, a summary."""
    findings = list(findings)
    lines = [f"edgecc doctor site_dir={site_dir}"]
    for finding in findings:
        lines.append(f"  {finding.level.value:<5} {finding.check}: {finding.message}")
        if finding.level.is_problem and finding.fix:
            lines.append(f"        fix: {finding.fix}")
    fails = sum(f.level is Level.FAIL for f in findings)
    warns = sum(f.level is Level.WARN for f in findings)
    if fails or warns:
        lines.append(f"doctor: {fails + warns} problem(s): {fails} failure(s), {warns} warning(s)")
    else:
        lines.append("doctor: all checks passed")
    return "\n".join(lines)


def doctor(site_dir: Path | str, out: TextIO) -> int:
    """Run the checks, print the report to ``out``; 0 when all is well, 1 otherwise."""
    findings = run_checks(site_dir)
    out.write(format_findings(findings, site_dir) + "\n")
    out.flush()
    return 1 if any(f.level.is_problem for f in findings) else 0


# --------------------------------------------------------------------------- checks


def _check_config(directory: Path, findings: list[Finding]) -> SiteConfig | None:
    try:
        config = load_site(directory)
    except ConfigError as exc:
        for issue in exc.issues:
            where = f"line {issue.line} of {issue.file}" if issue.line else issue.file
            findings.append(
                Finding(Level.FAIL, "config", str(issue),
                        f"edit {where} ({issue.key}): {issue.expected}")
            )
        return None
    findings.append(
        Finding(Level.OK, "config",
                f"{directory / SITE_FILE} is valid (site {config.site.id}, "
                f"{len(config.sip.accounts)} accounts)")
    )
    return config


def _check_site_dir(directory: Path) -> list[Finding]:
    if not directory.is_dir():
        return [Finding(Level.FAIL, "site-dir", f"{directory} is not a directory",
                        f"create it with `edgecc init --site-dir {directory}`")]
    # os.access says yes to root even on a read-only mount: try for real.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
            pass
    except OSError as exc:
        return [Finding(Level.FAIL, "site-dir", f"{directory} is not writable ({exc})",
                        f"give the appliance's user write access: chown/chmod u+w {directory}, "
                        "or remount the file system read-write")]
    return [Finding(Level.OK, "site-dir", f"{directory} is writable")]


def _check_permissions(directory: Path, config: SiteConfig | None) -> list[Finding]:
    secrets = [directory / SITE_FILE, directory / DEMO_CREDENTIALS, directory / INITIAL_CREDENTIALS]
    site_key = config.storage.site_key if config else directory / "site.key"
    secrets.append(site_key)
    if config is not None and config.sip.tls_port is not None:
        secrets.append(config.sip.tls.key)
    findings = []
    for path in secrets:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            findings.append(
                Finding(Level.FAIL, "permissions",
                        f"{path} is readable or writable by group/others (mode {mode:04o})",
                        f"chmod 600 {path}")
            )
        else:
            findings.append(Finding(Level.OK, "permissions", f"{path} mode {mode:04o}"))
    if not site_key.exists():
        findings.append(
            Finding(Level.WARN, "permissions", f"site key {site_key} is missing",
                    "restore it from the site's backup (recordings cannot be decrypted "
                    "without it); a new site gets one from `edgecc init`")
        )
    elif site_key.stat().st_size != SITE_KEY_BYTES:
        findings.append(
            Finding(Level.FAIL, "permissions",
                    f"site key {site_key} is {site_key.stat().st_size} bytes, "
                    f"expected {SITE_KEY_BYTES}",
                    "restore the site key from the site's backup")
        )
    return findings


@dataclass(frozen=True)
class _Listener:
    key: str
    kind: int  # socket.SOCK_DGRAM or socket.SOCK_STREAM
    host: str
    port: int

    @property
    def label(self) -> str:
        proto = "udp" if self.kind == socket.SOCK_DGRAM else "tcp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{proto}"


def _try_bind(listener: _Listener) -> OSError | None:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    with socket.socket(family, listener.kind) as sock:
        if listener.kind == socket.SOCK_STREAM:
            # The servers set SO_REUSEADDR too, so TIME_WAIT leftovers are not a problem.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listener.host, listener.port))
            if listener.kind == socket.SOCK_STREAM:
                sock.listen(1)
        except OSError as exc:
            return exc
    return None


def _bind_fix(listener: _Listener, exc: OSError) -> str:
    if exc.errno == errno.EACCES:
        return (f"ports below 1024 need root or CAP_NET_BIND_SERVICE; pick a port >= 1024 for "
                f"{listener.key} in site.yaml")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{listener.host} is not an address of this machine; correct the bind address"
    flag = "-lunp" if listener.kind == socket.SOCK_DGRAM else "-ltnp"
    return (f"find the program holding it with `ss {flag} 'sport = :{listener.port}'` and stop "
            f"it (is the appliance already running?), or set {listener.key} to a free port "
            "in site.yaml")


def _check_ports(config: SiteConfig) -> list[Finding]:
    sip, http = config.sip, config.http
    listeners = [
        _Listener("sip.udp_port", socket.SOCK_DGRAM, sip.bind, sip.udp_port),
        _Listener("sip.tcp_port", socket.SOCK_STREAM, sip.bind, sip.tcp_port),
    ]
    if sip.tls_port is not None:
        listeners.append(_Listener("sip.tls_port", socket.SOCK_STREAM, sip.bind, sip.tls_port))
    listeners.append(_Listener("http.port", socket.SOCK_STREAM, http.bind, http.port))
    findings = []
    for listener in listeners:
        if listener.port == 0:
            findings.append(Finding(Level.INFO, "ports",
                                    f"{listener.key} is 0: any free port is taken at start"))
            continue
        exc = _try_bind(listener)
        if exc is None:
            findings.append(Finding(Level.OK, "ports", f"{listener.key} {listener.label} is free"))
        else:
            findings.append(
                Finding(Level.FAIL, "ports",
                        f"{listener.key} {listener.label} cannot be bound ({exc.strerror or exc})",
                        _bind_fix(listener, exc))
            )
    findings.append(_check_rtp(config))
    return findings


def _rtp_sample(low: int, high: int, count: int = RTP_SAMPLE) -> list[int]:
    if high - low + 1 <= count:
        return list(range(low, high + 1))
    step = (high - low) / (count - 1)
    return sorted({low + round(i * step) for i in range(count)})


def _check_rtp(config: SiteConfig) -> Finding:
    low, high = config.media.rtp_ports
    sample = _rtp_sample(low, high)
    busy = []
    for port in sample:
        listener = _Listener("media.rtp_ports", socket.SOCK_DGRAM, config.sip.bind, port)
        exc = _try_bind(listener)
        if exc is not None:
            busy.append(f"{port} ({exc.strerror or exc})")
    if not busy:
        return Finding(Level.OK, "ports",
                       f"media.rtp_ports {low}-{high}: {len(sample)} sampled UDP ports free")
    level = Level.FAIL if len(busy) == len(sample) else Level.WARN
    return Finding(
        level, "ports",
        f"media.rtp_ports {low}-{high}: {len(busy)} of {len(sample)} sampled UDP ports busy: "
        + ", ".join(busy),
        "move media.rtp_ports to a range no other program uses (keep it below the kernel's "
        "ephemeral range, see /proc/sys/net/ipv4/ip_local_port_range)",
    )


def _check_disk(directory: Path) -> list[Finding]:
    target = directory if directory.exists() else directory.parent
    try:
        usage = shutil.disk_usage(target)
    except OSError as exc:
        return [Finding(Level.WARN, "disk", f"cannot read free space of {target} ({exc})",
                        "check that the site directory's file system is mounted")]
    free_gib = usage.free / (1 << 30)
    if usage.free < MIN_FREE_BYTES:
        return [Finding(Level.WARN, "disk",
                        f"only {free_gib:.2f} GiB free on the site's file system (< 1 GiB)",
                        "free space or move the site to a larger disk: recordings and the "
                        "database grow with every call")]
    return [Finding(Level.OK, "disk", f"{free_gib:.1f} GiB free")]


def check_clock(
    config: SiteConfig | None,
    started: ClockSample,
    *,
    timedatectl: Callable[[], tuple[str | None, str]] | None = None,
) -> list[Finding]:
    """Clock plausibility, steadiness since ``started``, site time zone, NTP state.

    ``timedatectl`` returns ("yes"/"no", detail) or (None, why unknown); by default the real
    ``timedatectl show`` is asked.
    """
    findings = []
    now = ClockSample.now()
    wall = dt.datetime.fromtimestamp(now.wall, dt.UTC)
    if wall < EARLIEST_SANE_TIME:
        findings.append(Finding(Level.FAIL, "clock",
                                f"system clock reads {wall:%Y-%m-%d %H:%M} UTC, which is not "
                                "plausible", "set the time and enable NTP (timedatectl "
                                "set-ntp true, or chrony/ntpd)"))
    jump = (now.wall - started.wall) - (now.mono - started.mono)
    if abs(jump) > CLOCK_JUMP_S:
        findings.append(Finding(Level.WARN, "clock",
                                f"wall clock moved {jump:+.1f} s against the monotonic clock "
                                "while doctor ran", "a clock step: check NTP (it should slew, "
                                "not step) and other programs setting the time"))
    else:
        findings.append(Finding(Level.OK, "clock",
                                f"system clock {wall:%Y-%m-%d %H:%M:%S} UTC, steady against the "
                                "monotonic clock"))
    if config is not None:
        zone = config.site.timezone
        try:
            local = dt.datetime.fromtimestamp(now.wall, zoneinfo.ZoneInfo(zone))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            findings.append(Finding(Level.FAIL, "clock", f"time zone {zone!r} is unknown here",
                                    "install the tzdata package or fix site.timezone"))
        else:
            findings.append(Finding(Level.OK, "clock",
                                    f"site time zone {zone}: {local:%Y-%m-%d %H:%M %Z}"))
    synced, detail = (timedatectl or _ntp_state)()
    if synced is None:
        findings.append(Finding(Level.INFO, "clock", f"NTP state unknown: {detail}"))
    elif synced == "yes":
        findings.append(Finding(Level.OK, "clock", "NTP synchronized"))
    else:
        findings.append(Finding(Level.WARN, "clock", "NTP not synchronized",
                                "enable time sync: timedatectl set-ntp true (or run chrony); "
                                "call records and certificates need a correct clock"))
    return findings


def _ntp_state() -> tuple[str | None, str]:
    """("yes"/"no", detail) from timedatectl, or (None, why) when it cannot tell."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return None, "timedatectl is not installed"
    try:
        result = subprocess.run(
            [exe, "show", "--property=NTPSynchronized", "--value"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"timedatectl failed ({exc})"
    value = result.stdout.strip()
    if result.returncode != 0 or value not in ("yes", "no"):
        why = (result.stderr.strip().splitlines() or ["no answer"])[0]
        return None, f"timedatectl cannot tell ({why})"
    return value, "timedatectl"


def check_tls(config: SiteConfig) -> list[Finding]:
    """The SIP TLS certificate loads, matches its key, and is valid now and for a while."""
    if config.sip.tls_port is None:
        return [Finding(Level.INFO, "tls", "TLS is disabled (sip.tls_port: null)")]
    cert_path, key_path = config.sip.tls.cert, config.sip.tls.key
    regenerate = (
        f"install a certificate from your CA, or make a new self-signed one: openssl req -x509 "
        f"-newkey rsa:2048 -nodes -days 365 -subj /CN={config.sip.realm} "
        f"-keyout {key_path} -out {cert_path} && chmod 600 {key_path}"
    )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        return [Finding(Level.FAIL, "tls", f"cannot load certificate {cert_path} ({exc})",
                        regenerate)]
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return [Finding(Level.FAIL, "tls", f"cannot load private key {key_path} ({exc})",
                        regenerate)]
    findings = []
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key(
    ).public_bytes(serialization.Encoding.DER, public):
        findings.append(Finding(Level.FAIL, "tls",
                                f"{key_path} is not the key of {cert_path}", regenerate))
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    days_left = (not_after - now).total_seconds() / 86400
    if now < not_before:
        findings.append(Finding(Level.FAIL, "tls",
                                f"certificate not valid before {not_before:%Y-%m-%d %H:%M} UTC "
                                "(is the clock right?)", regenerate))
    elif days_left < 0:
        findings.append(Finding(Level.FAIL, "tls",
                                f"certificate expired on {not_after:%Y-%m-%d}", regenerate))
    elif days_left < CERT_WARN_DAYS:
        findings.append(Finding(Level.WARN, "tls",
                                f"certificate expires in {days_left:.0f} days "
                                f"({not_after:%Y-%m-%d})", regenerate))
    else:
        subject = cert.subject.rfc4514_string()
        findings.append(Finding(Level.OK, "tls",
                                f"certificate {subject} valid until {not_after:%Y-%m-%d} "
                                f"({days_left:.0f} days)"))
    return findings


def _check_database(config: SiteConfig) -> list[Finding]:
    path = config.storage.database
    if not path.exists():
        return [Finding(Level.INFO, "database",
                        f"{path} does not exist yet; the appliance creates it at start")]
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            version = conn.execute("SELECT MAX(number) FROM schema_migrations").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [Finding(Level.FAIL, "database", f"cannot read {path} ({exc})",
                        "check its permissions; if it is damaged, stop the appliance and "
                        "restore the latest backup")]
    if result != "ok":
        return [Finding(Level.FAIL, "database", f"{path} failed quick_check: {result}",
                        "stop the appliance and restore the latest backup")]
    return [Finding(Level.OK, "database", f"{path} passes quick_check (schema {version})")]



TRUNK_STALE_MIN_S = 120.0
"""A trunk status older than this (or three keep-alive intervals) was not written by a running
appliance."""


def check_trunk(config: SiteConfig, *, now: float | None = None) -> list[Finding]:
    """The carrier trunk's keep-alive state and registration, from the ``trunk_status`` row the
    running appliance keeps (``appliance.sip.trunk``); nothing when no carrier is set."""
    from appliance.sip.trunk import read_trunk_status  # the SIP stack only when needed

    trunk = config.trunk
    if trunk.carrier is None:
        return []
    carrier = f"{trunk.carrier.host}:{trunk.carrier.port}"
    if not trunk.registration and trunk.options_interval is None:
        return [Finding(Level.INFO, "trunk",
                        f"{carrier}: registration and keep-alive are both disabled")]
    path = config.storage.database
    status = read_trunk_status(str(path)) if path.exists() else None
    if status is None or status.get("carrier") != carrier:
        return [Finding(Level.INFO, "trunk",
                        f"{carrier}: no status recorded yet (the running appliance records it)")]
    now = time.time() if now is None else now
    age = now - status["updated_at"]
    stale_after = max(TRUNK_STALE_MIN_S, 3 * (trunk.options_interval or 0.0))
    parts = [f"state {status['state']}"]
    if status["registration"] != "disabled":
        parts.append(f"registration {status['registration']}")
        if status["registration"] == "registered" and status["registered_until"]:
            parts.append(f"for {max(0, int(status['registered_until'] - now))} s more")
    if status["reason"]:
        parts.append(f"last outcome {status['reason']}")
    summary = f"{carrier}: " + ", ".join(parts) + f" (recorded {int(age)} s ago)"
    if age > stale_after:
        # Doctor also runs before the appliance starts: an old status is history, not a fault.
        return [Finding(Level.INFO, "trunk", summary + "; the appliance is not running")]
    if status["state"] == "down":
        return [Finding(Level.FAIL, "trunk", summary + f", {status['failures']} keep-alives "
                        "failed in a row",
                        "check trunk.carrier (host, port, transport), the firewall, and that "
                        "the carrier expects this site's address")]
    if status["registration"] == "failed":
        return [Finding(Level.FAIL, "trunk", summary,
                        "check trunk.auth (user, realm, HA1) with the carrier")]
    return [Finding(Level.OK, "trunk", summary)]
