"""``edgecc users``: create and list the API's users.

``edgecc users add --site-dir DIR --name N --role R`` reads the password from the terminal
(asked twice) or, when stdin is not a terminal, from its first line; it is never an argument,
so it never shows in ``ps`` or shell history. For admins and supervisors it prints the new TOTP
secret and its ``otpauth://`` URI once: enrol it in an authenticator app then, it is not shown
again. Exit status: 0 done, 1 the user exists or the site cannot be opened, 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from appliance.api import totp
from appliance.api.users import Role, UserError, UserStore

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``users`` (with ``add`` and ``list``) to the ``edgecc`` subcommands."""
    users = subparsers.add_parser("users", help="manage the users of the HTTP API",
                                  description="Create and list API users (admin, supervisor, "
                                  "agent). Admins and supervisors log in with a TOTP code.")
    commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = commands.add_parser("add", help="create a user; the password is read from stdin",
                              description="Create an API user. The password is asked for on "
                              "a terminal, or read from the first line of stdin.")
    add.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    add.add_argument("--name", required=True, help="login name (letters, digits, . _ @ -)")
    add.add_argument("--role", required=True, choices=[r.value for r in Role],
                     help="what the user may do")
    add.add_argument("--display-name", help="name shown in the UI")
    add.set_defaults(handler=_cmd_add)
    listing = commands.add_parser("list", help="list the users (no secrets)")
    listing.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    listing.set_defaults(handler=_cmd_list)
    return users


def _open_store(site_dir: Path, err: TextIO) -> UserStore | None:
    from appliance.config import ConfigError, load_site

    try:
        config = load_site(site_dir)
    except ConfigError as exc:
        print(f"edgecc users: invalid site configuration, nothing was changed\n{exc}", file=err)
        return None
    try:
        return UserStore.open(config.storage.database)
    except Exception as exc:
        print(f"edgecc users: cannot open the site database: {exc}", file=err)
        return None


def read_password(stdin: TextIO, err: TextIO) -> str | None:
    """The new password: asked twice on a terminal, else the first line of ``stdin``."""
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            print("edgecc users: the passwords differ, nothing was changed", file=err)
            return None
        return first
    line = stdin.readline()
    if not line:
        print("edgecc users: no password on stdin (give it as the first line)", file=err)
        return None
    return line.rstrip("\r\n")


def _cmd_add(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None,
             err: TextIO | None = None) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    password = read_password(stdin, err)
    if password is None:
        return EXIT_USAGE
    store = _open_store(args.site_dir, err)
    if store is None:
        return EXIT_PROBLEM
    try:
        try:
            user, secret = store.add_user(args.name, args.role, password, args.display_name)
        except UserError as exc:
            print(f"edgecc users: {exc}; nothing was changed", file=err)
            return EXIT_PROBLEM if "already exists" in str(exc) else EXIT_USAGE
        store.audit(f"cli:{_os_user()}", "api_user_added", name=user.name, role=user.role.value)
    finally:
        store.close()
    print(f"created {user.role.value} {user.name!r}", file=out)
    if secret is not None:
        print("two-factor secret (enrol it now in an authenticator app; it is not shown again):",
              file=out)
        print(f"  secret: {totp.secret_to_base32(secret)}", file=out)
        print(f"  uri:    {totp.otpauth_uri(secret, user.name)}", file=out)
    return EXIT_OK


def _cmd_list(args: argparse.Namespace, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    store = _open_store(args.site_dir, err)
    if store is None:
        return EXIT_PROBLEM
    try:
        users = store.users()
    finally:
        store.close()
    for user in users:
        flags = ["2fa" if user.two_factor else "no-2fa"]
        if user.locked_until is not None:
            flags.append("locked")
        print(f"{user.name}\t{user.role.value}\t{','.join(flags)}\t{user.display_name or ''}",
              file=out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m appliance.api.cli users ...``: the same commands outside ``edgecc``."""
    parser = argparse.ArgumentParser(prog="edgecc")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


if __name__ == "__main__":
    sys.exit(main())
