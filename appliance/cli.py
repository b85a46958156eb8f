"""The ``edgecc`` command line: ``init``, ``appliance``, ``doctor``.

Exit status: 0 success; 1 the command ran and something is wrong (doctor found problems, a site
already exists, the appliance could not start); 2 bad usage or an invalid site configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from appliance.config import ConfigError, load_site, parse_port_range
from appliance.site_init import (
    DEMO_CREDENTIALS,
    INITIAL_CREDENTIALS,
    CreatedSite,
    SiteExistsError,
    SiteSpec,
    create_site,
)

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _port_range(text: str) -> tuple[int, int]:
    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``edgecc``."""
    parser = argparse.ArgumentParser(prog="edgecc", description="edgecc hybrid contact center")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init", help="create a site directory (site.yaml, TLS certificate, keys, credentials)",
        description="Create a site. With --demo every value has a default and 20 demo agent "
        "accounts are made; otherwise --site-id, --realm and --bind are needed (asked for "
        "when run on a terminal).",
    )
    init.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    init.add_argument("--demo", action="store_true", help="a complete demo site on 127.0.0.1")
    init.add_argument("--force", action="store_true",
                      help="replace an existing site's config, certificate and credentials "
                      "(its site key and database are kept)")
    init.add_argument("--site-id", help="short id, e.g. paris-1 (lower case, digits, - and _)")
    init.add_argument("--site-name", help="human readable name (default: the id)")
    init.add_argument("--realm", help="SIP digest realm, e.g. paris.example.com")
    init.add_argument("--bind", help="address for SIP: 127.0.0.1, 0.0.0.0, :: or an own address")
    init.add_argument("--timezone", help="IANA time zone (default UTC)")
    init.add_argument("--sip-port", type=_port, help="SIP UDP and TCP port (default 5060)")
    init.add_argument("--tls-port", type=_port,
                      help="SIP TLS port (default 5061, or --sip-port + 1)")
    init.add_argument("--no-tls", action="store_true", help="no TLS listener")
    init.add_argument("--http-bind", help="address for the HTTP API (default 127.0.0.1)")
    init.add_argument("--http-port", type=_port, help="HTTP API port (default 8080)")
    init.add_argument("--rtp-ports", type=_port_range, metavar="LOW-HIGH",
                      help="RTP port range (default 20000-29999)")
    init.add_argument("--trunk-source", action="append", metavar="CIDR",
                      help="network the carrier trunk sends from (repeatable; default "
                      "127.0.0.1/32)")
    init.add_argument("--agents", type=_bounded(0, 10000),
                      help="agent accounts to create (default 20 with --demo, else 0)")
    init.add_argument("--first-extension", type=_bounded(0, 999_999_999), default=1001,
                      help="extension of the first agent account (default 1001)")
    init.set_defaults(handler=_cmd_init)

    appliance = commands.add_parser("appliance", help="run the site appliance")
    appliance.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    appliance.set_defaults(handler=_cmd_appliance)

    doctor = commands.add_parser("doctor", help="check that a site can run and how to fix it")
    doctor.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    doctor.set_defaults(handler=_cmd_doctor)

    from appliance.api.cli import add_parser as add_users_parser
    from appliance.reporting.cli import add_wfm_parser

    add_users_parser(commands)

    add_wfm_parser(commands)

    from appliance.recording.cli import add_parser as add_recordings_parser
    from appliance.reporting.cli import add_export_parser

    add_export_parser(commands)
    add_recordings_parser(commands)

    # The one console script starts every process; the cloud side is imported only here, lazily,
    # so the appliance itself never loads it (they meet only through proto/).
    from cloud_bridge.cli import add_parser as add_cloud_parser

    add_cloud_parser(commands)

    from edge_agent.cli import add_parser as add_edge_agent_parser

    add_edge_agent_parser(commands)

    from appliance.restore import add_parser as add_restore_parser

    add_restore_parser(commands)

    from appliance.simulate import add_parser as add_simulate_parser

    add_simulate_parser(commands)

    from appliance.devstack import add_parser as add_demo_parser

    add_demo_parser(commands)

    from appliance.audit import add_parser as add_audit_parser

    add_audit_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``edgecc`` command line and return its exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


# --------------------------------------------------------------------------- init

_REQUIRED = (
    ("site_id", "--site-id", "Site id (lower case, digits, - and _)", None),
    ("realm", "--realm", "SIP realm", lambda a: f"{a.site_id}.edgecc.local"),
    ("bind", "--bind", "SIP bind address", lambda a: "127.0.0.1"),
)


def _ask_missing(args: argparse.Namespace) -> str | None:
    """Fill required values from the terminal; return an error message when that is impossible."""
    missing = [flag for name, flag, _, _ in _REQUIRED if getattr(args, name) is None]
    if not missing:
        return None
    if not sys.stdin.isatty():
        return (
            f"missing {', '.join(missing)} (stdin is not a terminal, so they cannot be asked "
            "for); pass them, e.g. `edgecc init --site-dir DIR --site-id paris-1 --realm "
            "paris.example.com --bind 0.0.0.0`, or use --demo"
        )
    for name, _flag, prompt, suggest in _REQUIRED:
        while getattr(args, name) is None:
            default = suggest(args) if suggest else None
            try:
                answer = input(f"{prompt}{f' [{default}]' if default else ''}: ").strip()
            except EOFError:
                return f"no answer for {prompt.lower()}"
            value = answer or default
            if value:
                setattr(args, name, value)
    return None


def _spec_from_args(args: argparse.Namespace) -> SiteSpec:
    spec = SiteSpec() if args.demo else SiteSpec(
        site_id=args.site_id, site_name=args.site_name or args.site_id, realm=args.realm,
        bind=args.bind, agents=0, credentials_file=INITIAL_CREDENTIALS,
    )
    changes: dict[str, object] = {}
    for name in ("site_id", "realm", "bind", "timezone", "http_bind", "http_port", "rtp_ports",
                 "agents", "first_extension"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.site_name is not None:
        changes["site_name"] = args.site_name
    if args.sip_port is not None:
        changes["sip_port"] = args.sip_port
    if args.no_tls:
        changes["tls_port"] = None
    elif args.tls_port is not None:
        changes["tls_port"] = args.tls_port
    elif args.sip_port is not None:
        changes["tls_port"] = args.sip_port + 1 if args.sip_port else 0
    if args.trunk_source:
        changes["trunk_sources"] = tuple(args.trunk_source)
    return replace(spec, **changes)  # type: ignore[arg-type]


def _cmd_init(args: argparse.Namespace) -> int:
    if not args.demo:
        problem = _ask_missing(args)
        if problem:
            print(f"edgecc init: {problem}", file=sys.stderr)
            return EXIT_USAGE
    spec = _spec_from_args(args)
    try:
        created = create_site(args.site_dir, spec, force=args.force)
    except SiteExistsError as exc:
        print(f"edgecc init: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except ConfigError as exc:
        print(f"edgecc init: these options do not make a valid site, nothing was written\n{exc}",
              file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"edgecc init: cannot write the site: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    _print_created(created, spec)
    return EXIT_OK


def _print_created(created: CreatedSite, spec: SiteSpec) -> None:
    config = created.config
    print(f"created site {config.site.id!r} in {created.site_dir}")
    for path in created.files:
        print(f"  wrote {path}")
    for path in created.kept:
        print(f"  kept  {path}")
    if created.credentials is not None:
        users = [a.user for a in config.sip.accounts]
        print(f"  {len(users)} agent accounts {users[0]}..{users[-1]}; their passwords are in "
              f"{created.credentials} (mode 0600)")
        if created.credentials.name == DEMO_CREDENTIALS:
            print("  point a SIP phone at it: see README.md, 'Register a SIP phone'")
    print(f"start it with: edgecc appliance --site-dir {created.site_dir}")


# --------------------------------------------------------------------------- appliance, doctor


def _cmd_appliance(args: argparse.Namespace) -> int:
    try:
        config = load_site(args.site_dir)
    except ConfigError as exc:
        print(f"edgecc appliance: refusing to start, nothing was changed\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    from appliance.log import setup_logging

    setup_logging()
    from appliance.app import RESTART, run

    code = run(config, sys.stdout, site_dir=args.site_dir)
    if code == RESTART:
        # A config pushed by the cloud and installed by the edge agent: load it in a fresh
        # process image (same PID, so a service manager sees no exit); calls were not cut.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "appliance.cli", "appliance",
                                  "--site-dir", str(args.site_dir)])
    return code


def _cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import doctor

    return doctor(args.site_dir, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
