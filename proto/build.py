"""Generate the Python code of the bridge's ``.proto`` files with ``grpc_tools.protoc``.

``python -m proto.build`` writes ``bridge_pb2.py``, ``bridge_pb2_grpc.py`` and
``bridge_pb2.pyi`` next to ``bridge.proto``. The files are compiled with the repository root
as include path, so the generated modules import each other as ``proto.bridge_pb2`` and the
``.proto`` is known to the descriptor pool as ``proto/bridge.proto``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SOURCES: tuple[str, ...] = ("bridge.proto",)


class ProtoBuildError(Exception):
    """protoc refused a ``.proto`` file."""


def _outputs(source: str) -> tuple[str, ...]:
    stem = source.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi")


def generate(out_dir: Path | str | None = None) -> list[Path]:
    """Generate the modules of every ``.proto`` into ``out_dir`` (default: this package).

    Files are generated into a scratch directory and moved into place one by one with
    ``os.replace``, so a concurrent importer never reads half a module. Returns the paths
    written. Raises ProtoBuildError when protoc fails.
    """
    from grpc_tools import protoc  # build-time dependency only

    target = Path(out_dir) if out_dir is not None else PROTO_DIR
    target.mkdir(parents=True, exist_ok=True)
    root = PROTO_DIR.parent
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="edgecc-proto-") as scratch:
        for source in SOURCES:
            args = [
                "grpc_tools.protoc",
                f"-I{root}",
                f"-I{well_known}",
                f"--python_out={scratch}",
                f"--grpc_python_out={scratch}",
                f"--pyi_out={scratch}",
                str(PROTO_DIR / source),
            ]
            status = protoc.main(args)
            if status != 0:
                raise ProtoBuildError(f"protoc failed on {source} (exit status {status})")
            for name in _outputs(source):
                produced = Path(scratch) / PROTO_DIR.name / name
                staged = target / f".{name}.tmp"
                # Generated code is not ours to lint, whatever the linter's exclude list says.
                staged.write_bytes(b"# ruff: noqa\n" + produced.read_bytes())
                os.replace(staged, target / name)
                written.append(target / name)
    return written


def is_stale(out_dir: Path | str | None = None) -> bool:
    """True when a generated module is missing or older than its ``.proto``."""
    target = Path(out_dir) if out_dir is not None else PROTO_DIR
    for source in SOURCES:
        mtime = (PROTO_DIR / source).stat().st_mtime
        for name in _outputs(source):
            path = target / name
            if not path.exists() or path.stat().st_mtime < mtime:
                return True
    return False


def ensure_generated() -> None:
    """Generate the modules in this package unless they are present and up to date."""
    if is_stale():
        generate()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m proto.build [OUT_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        paths = generate(args[0] if args else None)
    except ProtoBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"generated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
