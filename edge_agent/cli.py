"""``edgecc edge-agent``: run the site's link to the cloud, or enrol the site.

    edgecc edge-agent --site-dir DIR
    edgecc edge-agent enrol --site-dir DIR --cloud HOST:PORT --token T --ca-cert FILE
                            [--enrol-port N] [--force]

``add_parser(commands)`` adds ``edge-agent`` to the ``edgecc`` parser; ``main(argv)`` runs it
alone (``python -m edge_agent ...``). Exit status: 0 stopped cleanly or enrolled; 1 enrolment
refused or the agent cannot run with these files; 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected 1 to 65535, got {value}")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``edge-agent`` and ``edge-agent enrol`` to an ``add_subparsers()`` object.

    The parsed namespace has ``handler``: call ``args.handler(args)`` for the exit status.
    """
    agent = commands.add_parser(
        "edge-agent", help="run the site's link to the cloud, or enrol the site",
        description="Without a sub-command: relay the site's outbox to the cloud until "
        "SIGTERM/SIGINT. Settings come from SITE_DIR/cloud.yaml (see docs/edge-agent.md).",
    )
    agent.add_argument("--site-dir", type=Path, default=None, help="directory of the site")
    agent.set_defaults(handler=_cmd_run)
    sub = agent.add_subparsers(dest="edge_command", metavar="SUBCOMMAND")
    enrol = sub.add_parser(
        "enrol", help="exchange a one-time token for the site's certificate",
        description="Creates the site's key, asks the cloud for a certificate with a token from "
        "`edgecc cloud token --site ID`, and writes key, certificate, the cloud's CA and "
        "cloud.yaml into the site directory.",
    )
    # Suppressed so that a --site-dir given before `enrol` is not overwritten.
    enrol.add_argument("--site-dir", type=Path, default=argparse.SUPPRESS,
                       help="directory of the site")
    enrol.add_argument("--cloud", required=True, metavar="HOST:PORT",
                       help="the cloud's link port, e.g. cloud.example.com:50051")
    enrol.add_argument("--token", required=True, help="one-time enrolment token")
    enrol.add_argument("--ca-cert", type=Path, required=True,
                       help="the cloud's CA certificate (PEM), from the installer")
    enrol.add_argument("--enrol-port", type=_port, default=None,
                       help="the cloud's enrolment port (default: link port + 1)")
    enrol.add_argument("--force", action="store_true",
                       help="replace an existing certificate (needs a new token)")
    enrol.set_defaults(handler=_cmd_enrol)
    return agent


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-agent`` on its own; return the exit status."""
    parser = argparse.ArgumentParser(prog="edgecc")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["edge-agent", *(sys.argv[1:] if argv is None else argv)])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _site_dir(args: argparse.Namespace, command: str) -> Path | None:
    if args.site_dir is None:
        print(f"edgecc {command}: --site-dir is required", file=sys.stderr)
        return None
    return Path(args.site_dir)


def _cmd_enrol(args: argparse.Namespace) -> int:
    site_dir = _site_dir(args, "edge-agent enrol")
    if site_dir is None:
        return EXIT_USAGE
    from appliance.log import setup_logging
    from edge_agent.enrol import EnrolmentError, enrol

    setup_logging()
    try:
        done = enrol(site_dir, cloud=args.cloud, token=args.token, ca_cert=args.ca_cert,
                     enrol_port=args.enrol_port, force=args.force)
    except EnrolmentError as exc:
        print(f"edgecc edge-agent enrol: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"enrolled site {done.site_id!r}: certificate {done.certificate} (serial "
          f"{done.serial:x}, valid until {done.not_after:%Y-%m-%d}); start the link with: "
          f"edgecc edge-agent --site-dir {site_dir}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    site_dir = _site_dir(args, "edge-agent")
    if site_dir is None:
        return EXIT_USAGE
    from appliance.log import setup_logging
    from edge_agent.config import EdgeConfigError, load_edge_config
    from edge_agent.relay import AgentError, EdgeAgent

    try:
        config = load_edge_config(site_dir)
    except EdgeConfigError as exc:
        print(f"edgecc edge-agent: refusing to start\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        agent = EdgeAgent(config, stop=stop)
        print(f"edgecc edge-agent site={agent.site_id} cloud={config.cloud.address} "
              f"database={config.database}", flush=True)
        agent.run()
    except AgentError as exc:
        print(f"edgecc edge-agent: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
