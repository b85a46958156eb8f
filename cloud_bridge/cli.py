"""``edgecc cloud``: run the cloud server, and the central IT console's commands.

    edgecc cloud --data-dir DIR [--bind ADDR] [--grpc-port N] [--enrol-port N] [--db URL]
                 [--http-bind ADDR] [--http-port N]
    edgecc cloud --data-dir DIR sites
    edgecc cloud --data-dir DIR backups [--site ID]
    edgecc cloud --data-dir DIR token --site ID [--ttl SECONDS]
    edgecc cloud --data-dir DIR revoke --serial HEX
    edgecc cloud --data-dir DIR push-config --site ID --file site.yaml
    edgecc cloud --data-dir DIR kpis [--since WHEN] [--until WHEN] [--interval 1800]
                 [--site ID] [--threshold 20] [--json]

``push-config`` signs the file with the CA of the data directory and stores it as the site's next
config version; a running server sends it down the site's live link within
``CloudConfig.config_poll_s`` (it watches the store), or when the site next says Hello.

``add_parser(commands)`` adds ``cloud`` to the ``edgecc`` parser; ``main(argv)`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml as yaml_parser

from cloud_bridge.backups import RESTORE_TOKEN_TTL_S
from cloud_bridge.ca import CertificateAuthority, CertificateError, check_site_id
from cloud_bridge.store import CloudStore, StoreError, make_token, open_store

DEFAULT_TOKEN_TTL = 24 * 3600
STOP_GRACE_S = 1.0
MAX_CONFIG_BYTES = 256 * 1024
"""Largest site.yaml pushed: well inside one gRPC message."""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected 0 to 65535, got {value}")
    return value


def _site_id(text: str) -> str:
    try:
        return check_site_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 60 <= value <= 30 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"expected 60 to 2592000 seconds, got {value}")
    return value


def _moment(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date/time (2026-11-25T09:00) or Unix seconds, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _serial(text: str) -> int:
    try:
        return int(text.replace(":", ""), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a hexadecimal serial, got {text!r}") from None


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # On sub-commands the defaults are suppressed so that they do not overwrite values given
    # before the sub-command's name.
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--data-dir", type=Path, default=default,
                        help="cloud data directory (CA, database, backups)")
    parser.add_argument("--db", default=default, metavar="URL",
                        help="database: postgresql://USER@HOST/DB, sqlite:PATH or a path "
                        "(default DATA_DIR/cloud.db)")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``cloud`` and its sub-commands to an ``add_subparsers()`` object; return it.

    The parsed namespace has ``handler``: call ``args.handler(args)`` for the exit status.
    """
    cloud = commands.add_parser(
        "cloud", help="run the cloud server, or manage sites, tokens and backups",
        description="Without a sub-command: run the cloud gRPC server until SIGTERM/SIGINT.",
    )
    _common(cloud, suppress=False)
    cloud.add_argument("--bind", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 or :: for all)")
    cloud.add_argument("--grpc-port", type=_port, default=50051,
                       help="link port, mutual TLS (default 50051; 0 = any free port)")
    cloud.add_argument("--enrol-port", type=_port, default=None,
                       help="enrolment port, server TLS only (default grpc-port + 1)")
    cloud.add_argument("--server-name", action="append", metavar="NAME",
                       help="DNS name or address sites use to reach the cloud (repeatable; "
                       "default localhost, 127.0.0.1, ::1)")
    cloud.add_argument("--keep-backups", type=int, default=7,
                       help="complete backups kept per site (default 7)")
    cloud.add_argument("--http-bind", default="127.0.0.1",
                       help="address of the console web page (default 127.0.0.1; it has no "
                       "login, so keep it local or behind an authenticating proxy)")
    cloud.add_argument("--http-port", type=_port, default=8090,
                       help="console web page port (default 8090; 0 = any free port)")
    cloud.set_defaults(handler=_cmd_serve)
    sub = cloud.add_subparsers(dest="cloud_command", metavar="SUBCOMMAND")

    sites = sub.add_parser("sites", help="list sites: ack, held events, certificate")
    _common(sites, suppress=True)
    sites.set_defaults(handler=_cmd_sites)

    backups = sub.add_parser("backups", help="list stored backups")
    _common(backups, suppress=True)
    backups.add_argument("--site", type=_site_id, help="only this site")
    backups.set_defaults(handler=_cmd_backups)

    token = sub.add_parser("token", help="issue a one-time enrolment token for a site")
    _common(token, suppress=True)
    token.add_argument("--site", type=_site_id, required=True, help="site id, e.g. paris-1")
    token.add_argument("--ttl", type=_ttl, default=DEFAULT_TOKEN_TTL,
                       help="seconds the token stays valid (default 86400)")
    token.set_defaults(handler=_cmd_token)

    restore = sub.add_parser(
        "restore-token", help="issue a token that restores a site's backup on a new machine",
        description="Print a token for `edgecc restore --from-cloud`: it enrols the new machine "
        "as the site and opens the site's latest backup (or --backup ID). It carries the site "
        "key: hand it over like a password.")
    _common(restore, suppress=True)
    restore.add_argument("--site", type=_site_id, required=True, help="site id, e.g. paris-1")
    restore.add_argument("--backup", metavar="ID", help="a stored backup (default: the latest)")
    restore.add_argument("--ttl", type=_ttl, default=RESTORE_TOKEN_TTL_S,
                         help=f"seconds the token stays valid (default {RESTORE_TOKEN_TTL_S:.0f})")
    restore.set_defaults(handler=_cmd_restore_token)

    revoke = sub.add_parser("revoke", help="revoke a site certificate by serial")
    _common(revoke, suppress=True)
    revoke.add_argument("--serial", type=_serial, required=True, help="serial, hexadecimal")
    revoke.set_defaults(handler=_cmd_revoke)

    push = sub.add_parser(
        "push-config", help="sign and store a site's next config version",
        description="Sign site.yaml with the cloud's CA and store it as the site's next config "
        "version. A running cloud sends it down the site's link within seconds, or when the "
        "site next connects. The site applies it whole or not at all.",
    )
    _common(push, suppress=True)
    push.add_argument("--site", type=_site_id, required=True, help="site id, e.g. paris-1")
    push.add_argument("--file", type=Path, required=True, help="the whole site.yaml to push")
    push.set_defaults(handler=_cmd_push_config)

    kpis = sub.add_parser(
        "kpis", help="queue KPIs per site and for all sites, per interval",
        description="Offered, answered, abandoned, service level and ASA of the calls that "
        "entered a queue in the period, counted from the queue events the sites sent up.",
    )
    _common(kpis, suppress=True)
    kpis.add_argument("--since", type=_moment, default=None, metavar="WHEN",
                      help="start: ISO date/time (UTC unless it has an offset) or Unix seconds "
                      "(default: 24 h before --until)")
    kpis.add_argument("--until", type=_moment, default=None, metavar="WHEN",
                      help="end, exclusive (default: now)")
    kpis.add_argument("--interval", type=int, choices=(900, 1800, 3600), default=1800,
                      help="interval length in seconds (default 1800)")
    kpis.add_argument("--site", type=_site_id, default=None, help="only this site")
    kpis.add_argument("--threshold", type=float, default=20.0,
                      help="service-level threshold in seconds (default 20)")
    kpis.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    kpis.set_defaults(handler=_cmd_kpis)

    head = sub.add_parser(
        "audit-head", help="the site's newest audit chain head sent to the cloud (id and hash)",
        description="Prints the last audit.head event the site sent: give its hash to "
                    "'edgecc audit verify --expect-head HASH' on the site to prove the site's "
                    "audit log was not rewritten since.")
    _common(head, suppress=True)
    head.add_argument("site", type=_site_id, help="site id")
    head.set_defaults(handler=_cmd_audit_head)
    return cloud


def main(argv: list[str] | None = None) -> int:
    """Run ``cloud`` on its own (``python -m cloud_bridge.cli ...``); return the exit status."""
    parser = argparse.ArgumentParser(prog="edgecc")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cloud", *(sys.argv[1:] if argv is None else argv)])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _data_dir(args: argparse.Namespace) -> Path | None:
    if args.data_dir is None:
        print("error: --data-dir is required", file=sys.stderr)
        return None
    return Path(args.data_dir)


def _open(args: argparse.Namespace) -> CloudStore | None:
    data_dir = _data_dir(args)
    if data_dir is None:
        return None
    try:
        return open_store(args.db or str(data_dir / "cloud.db"), data_dir=data_dir)
    except (StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------- serve


def _cmd_serve(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    if data_dir is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    from cloud_bridge.server import CloudConfig

    config = CloudConfig(
        data_dir=data_dir, bind=args.bind, grpc_port=args.grpc_port, enrol_port=args.enrol_port,
        db_url=args.db,
        server_names=tuple(args.server_name) if args.server_name else CloudConfig.server_names,
        keep_backups=max(1, args.keep_backups),
        http_bind=args.http_bind, http_port=args.http_port,
    )
    try:
        return asyncio.run(_serve(config))
    except (OSError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _serve(config: Any) -> int:
    from cloud_bridge.server import CloudServer

    server = CloudServer(config)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    console = f"http={server.console.url} " if server.console is not None else ""
    print(
        f"edgecc cloud listening link={config.bind}:{server.link_port} "
        f"enrol={config.bind}:{server.enrol_port} {console}data_dir={config.data_dir} "
        f"db={server.store.location}",
        flush=True,
    )
    await stop.wait()
    await server.stop(STOP_GRACE_S)
    return 0


# ------------------------------------------------------------------- console


def _cmd_sites(args: argparse.Namespace) -> int:
    store = _open(args)
    if store is None:
        return 2
    try:
        rows = store.sites()
    finally:
        store.close()
    if not rows:
        print("no sites")
        return 0
    print(f"{'SITE':<24} {'ACK':>10} {'HELD':>6} {'LAST SEEN':<20} {'CERT SERIAL':<34} NOT AFTER")
    for s in rows:
        serial = f"{s.certificate_serial:x}" if s.certificate_serial else "-"
        print(f"{s.site_id:<24} {s.acked_seq:>10} {s.held_events:>6} {_when(s.last_seen_at):<20} "
              f"{serial:<34} {_when(s.certificate_not_after)}")
    return 0


def _cmd_backups(args: argparse.Namespace) -> int:
    store = _open(args)
    if store is None:
        return 2
    try:
        rows = store.backups(args.site)
    finally:
        store.close()
    if not rows:
        print("no backups")
        return 0
    print(f"{'SITE':<24} {'BACKUP':<40} {'STATE':<8} {'BYTES':>14} {'COMPLETED':<20} SHA-256")
    for b in rows:
        state = "complete" if b.complete else "partial"
        digest = b.sha256.hex() if b.sha256 else "-"
        print(f"{b.site_id:<24} {b.backup_id:<40} {state:<8} {b.committed:>14} "
              f"{_when(b.completed_at):<20} {digest}")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    store = _open(args)
    if store is None:
        return 2
    now = time.time()
    token = make_token()
    try:
        store.add_token(args.site, token, now + args.ttl, now)
    finally:
        store.close()
    print(token)
    print(f"site={args.site} expires={_when(now + args.ttl)} (single use)", file=sys.stderr)
    return 0


def _cmd_restore_token(args: argparse.Namespace) -> int:
    from cloud_bridge.backups import BackupError, restore_token_command
    from edge_agent.bundle import BundleError

    data_dir = _data_dir(args)
    if data_dir is None:
        return 2
    try:
        token = restore_token_command(data_dir, args.site, ttl=args.ttl, backup_id=args.backup,
                                      db_url=args.db)
    except (BackupError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(token)
    print(f"site={args.site} expires={_when(time.time() + args.ttl)} (carries the site key)",
          file=sys.stderr)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    store = _open(args)
    if store is None:
        return 2
    try:
        changed = store.revoke_certificate(args.serial, time.time())
    finally:
        store.close()
    print(f"serial={args.serial:x} {'revoked' if changed else 'already revoked'}")
    return 0


def _read_config(path: Path, site_id: str) -> bytes:
    """The bytes of a site.yaml worth pushing; ValueError says what is wrong with it.

    The cloud does not import the appliance's schema: it checks that the file is a YAML
    mapping for this site, and the site validates it whole before applying it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {len(data)} bytes, over the {MAX_CONFIG_BYTES} byte limit")
    try:
        document = yaml_parser.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml_parser.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{path}:{where}: not valid YAML: {problem}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping (site:, sip:, ...) at the top level")
    site = document.get("site")
    named = site.get("id") if isinstance(site, dict) else None
    if named is not None and str(named) != site_id:
        raise ValueError(f"{path}: site.id is {named!r}, not {site_id!r}: wrong file for this site?")
    return data


def _cmd_push_config(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    if data_dir is None:
        return 2
    try:
        yaml = _read_config(args.file, args.site)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ca_dir = data_dir / "ca"
    if not (ca_dir / "ca.key").exists():
        # Never create a CA here: sites trust only the one they enrolled with.
        print(f"error: no CA in {ca_dir}: run the cloud once with this --data-dir first",
              file=sys.stderr)
        return 2
    try:
        ca = CertificateAuthority.load_or_create(ca_dir)
    except (CertificateError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = _open(args)
    if store is None:
        return 2
    try:
        from cloud_bridge.server import read_site_report, reported_config_version

        above = reported_config_version(read_site_report(data_dir, args.site))
        record = store.add_config(args.site, yaml, ca.sign_config, time.time(), above=above)
    finally:
        store.close()
    print(f"site={record.site_id} version={record.version} bytes={len(yaml)} "
          f"sha256={hashlib.sha256(yaml).hexdigest()}")
    return 0



# ------------------------------------------------------------------- KPIs


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cmd_audit_head(args: argparse.Namespace) -> int:
    store = _open(args)
    if store is None:
        return 2
    try:
        event = store.latest_event(args.site, "audit.head")
    finally:
        store.close()
    if event is None:
        print(f"no audit head from site {args.site} yet", file=sys.stderr)
        return 1
    try:
        head = json.loads(event.payload)
        row_id, digest = int(head["id"]), str(head["hash"])
    except (ValueError, KeyError, TypeError) as exc:
        print(f"error: the stored audit.head event {event.seq} cannot be read: {exc!r}",
              file=sys.stderr)
        return 2
    print(f"site={args.site} id={row_id} hash={digest} at={_when(event.occurred_at)} "
          f"seq={event.seq}")
    return 0


def _cmd_kpis(args: argparse.Namespace) -> int:
    import json

    from cloud_bridge.analytics import KpiSettings, cross_site_kpis

    until = args.until if args.until is not None else time.time()
    since = args.since if args.since is not None else until - 24 * 3600
    if until <= since:
        print(f"error: --until ({_when(until)}) must be after --since ({_when(since)})",
              file=sys.stderr)
        return 2
    try:
        settings = KpiSettings(interval=args.interval, service_level_threshold=args.threshold)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = _open(args)
    if store is None:
        return 2
    try:
        report = cross_site_kpis(store, since, until, settings, site_id=args.site)
    finally:
        store.close()
    if args.json:
        print(json.dumps({
            "since": since, "until": until, "interval": settings.interval,
            "service_level_threshold": settings.service_level_threshold,
            "skipped_events": report.skipped, "rows": [r.as_dict() for r in report.rows],
        }))
        return 0
    print(f"since={_when(since)} until={_when(until)} interval={settings.interval}s "
          f"threshold={settings.service_level_threshold:g}s skipped_events={report.skipped}")
    print(f"{'SITE':<24} {'INTERVAL':<20} {'OFFERED':>8} {'ANSWERED':>9} {'ABANDONED':>10} "
          f"{'TIMED OUT':>10} {'WAITING':>8} {'SL':>7} {'ASA S':>7}")
    for r in report.rows:
        start = "total" if r.interval_start is None else _when(r.interval_start)
        print(f"{r.site_id:<24} {start:<20} {r.offered:>8} {r.answered:>9} {r.abandoned:>10} "
              f"{r.timed_out:>10} {r.waiting:>8} {_percent(r.service_level):>7} "
              f"{_seconds(r.asa):>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
