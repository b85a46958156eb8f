"""``edgecc cloud``: run the cloud server, and the central IT console's commands.

    edgecc cloud --data-dir DIR [--bind ADDR] [--grpc-port N] [--enrol-port N] [--db URL]
    edgecc cloud --data-dir DIR sites
    edgecc cloud --data-dir DIR backups [--site ID]
    edgecc cloud --data-dir DIR token --site ID [--ttl SECONDS]
    edgecc cloud --data-dir DIR revoke --serial HEX

``add_parser(commands)`` adds ``cloud`` to the ``edgecc`` parser; ``main(argv)`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_bridge.ca import check_site_id
from cloud_bridge.store import SqliteCloudStore, StoreError, make_token, open_store

DEFAULT_TOKEN_TTL = 24 * 3600
STOP_GRACE_S = 1.0


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
                        help="database: sqlite:PATH or a path (default DATA_DIR/cloud.db)")


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

    revoke = sub.add_parser("revoke", help="revoke a site certificate by serial")
    _common(revoke, suppress=True)
    revoke.add_argument("--serial", type=_serial, required=True, help="serial, hexadecimal")
    revoke.set_defaults(handler=_cmd_revoke)
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


def _open(args: argparse.Namespace) -> SqliteCloudStore | None:
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
    print(
        f"edgecc cloud listening link={config.bind}:{server.link_port} "
        f"enrol={config.bind}:{server.enrol_port} data_dir={config.data_dir} "
        f"db={server.store.path}",
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


if __name__ == "__main__":
    raise SystemExit(main())
