"""``edgecc recordings export ID --out FILE --site-dir DIR --user NAME``: one recording,
decrypted, as a WAV file, for a supervisor or an admin of the HTTP API.

The user proves who they are exactly as at the API's login (``UserStore.login``: password and,
for supervisors and admins, a TOTP code; failures count towards the same lockout). The password
is asked for on a terminal or read from the first line of stdin, never taken as an argument;
the TOTP code comes from ``--code`` or the second line of stdin. Every export and every refusal
leaves an audit row (``recording_download`` / ``recording_download_refused``, actor
``cli:NAME``), written before the audio leaves. A tampered or truncated file fails its
integrity check and nothing is written. Exit status: 0 exported, 1 refused or failed, 2 bad
usage.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
_SOURCE = "cli"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``recordings`` (with ``export``) to the ``edgecc`` subcommands."""
    recordings = subparsers.add_parser(
        "recordings", help="call recordings: export one decrypted (audited)",
        description="Work with the site's encrypted call recordings.")
    commands = recordings.add_subparsers(dest="recordings_command", required=True,
                                         metavar="ACTION")
    export = commands.add_parser(
        "export", help="write one recording, decrypted, as a WAV file",
        description="Decrypt one recording to a new WAV file. Only supervisors and admins of "
        "the API may; the password is read from the terminal or the first line of stdin, the "
        "TOTP code from --code or the second line of stdin.")
    export.add_argument("recording_id", metavar="ID", help="the recording's id")
    export.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    export.add_argument("--out", type=Path, required=True,
                        help="WAV file to create (must not exist)")
    export.add_argument("--user", required=True, help="API user name (supervisor or admin)")
    export.add_argument("--code", help="TOTP code (default: the second line of stdin)")
    export.set_defaults(handler=_cmd_export)
    return recordings


def _secrets(args: argparse.Namespace, stdin: TextIO) -> tuple[str, str | None] | None:
    if stdin.isatty():
        password = getpass.getpass(f"Password of {args.user}: ")
        code = args.code or input("TOTP code (empty if none): ").strip() or None
        return password, code
    line = stdin.readline()
    if not line:
        return None
    code = args.code
    if code is None:
        second = stdin.readline().strip()
        code = second or None
    return line.rstrip("\r\n"), code


def _cmd_export(args: argparse.Namespace, stdin: TextIO | None = None,
                out: TextIO | None = None, err: TextIO | None = None) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr

    def fail(message: str, status: int = EXIT_PROBLEM) -> int:
        print(f"edgecc recordings export: {message}", file=err)
        return status

    from appliance.api.users import LoginOutcome, Role, UserStore
    from appliance.config import ConfigError, load_site
    from appliance.recording.crypto import RecordingCryptoError, load_site_key
    from appliance.recording.store import RecordingErased, RecordingStore, UnknownRecording
    from appliance.store import open_site_db

    if args.out.exists():
        return fail(f"--out {args.out} exists; give a new file name", EXIT_USAGE)
    try:
        config = load_site(args.site_dir)
    except ConfigError as exc:
        return fail(f"invalid site configuration, nothing was read\n{exc}", EXIT_USAGE)
    secrets = _secrets(args, stdin)
    if secrets is None:
        return fail("no password on stdin (give it as the first line)", EXIT_USAGE)
    try:
        users = UserStore.open(config.storage.database)
    except Exception as exc:
        return fail(f"cannot open the site database: {exc}")
    actor = f"cli:{args.user}"
    rid = args.recording_id
    try:
        result = users.login(args.user, secrets[0], secrets[1], _SOURCE)
        if result.outcome is not LoginOutcome.OK or result.principal is None:
            users.audit(actor, "recording_download_refused", recording=rid,
                        reason=f"login {result.outcome.value}", source=_SOURCE)
            return fail("login refused (wrong name, password or code, or the user is locked)")
        # The CLI needs no session: the token issued by the login ends here.
        users.revoke(result.principal.token_hash)
        if not result.principal.role.allows(Role.SUPERVISOR):
            users.audit(actor, "recording_download_refused", recording=rid, reason="role",
                        source=_SOURCE)
            return fail(f"user {args.user} is an {result.principal.role.value}; only "
                        "supervisors and admins may export recordings")
        key_path = config.storage.site_key
        store_db = open_site_db(config.storage.database)
        try:
            store = RecordingStore(store_db, config.storage.recordings,
                                   load_site_key(key_path.parent, key_path.name))
            info = store.get(rid)
            wav = store.read_wav(rid)
        except UnknownRecording:
            return fail(f"no recording {rid}")
        except RecordingErased as exc:
            users.audit(actor, "recording_download_refused", recording=rid, reason="erased",
                        source=_SOURCE)
            return fail(str(exc))
        except (RecordingCryptoError, OSError) as exc:
            users.audit(actor, "recording_download_refused", recording=rid,
                        reason="integrity", source=_SOURCE)
            return fail(f"recording {rid} failed its integrity check, nothing was written: "
                        f"{type(exc).__name__}: {exc}")
        finally:
            store_db.conn.close()
        # Written before the audio leaves: no export without its row.
        users.audit(actor, "recording_download", recording=rid, call=info.call_id,
                    bytes=len(wav), source=_SOURCE)
        try:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(wav)
        except OSError as exc:
            return fail(f"cannot write {args.out}: {exc.strerror}")
    finally:
        users.close()
    print(f"exported recording {rid} (call {info.call_id}, {len(wav)} bytes) to {args.out}",
          file=out)
    return EXIT_OK
