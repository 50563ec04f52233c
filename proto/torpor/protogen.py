"""`make proto`: regenerate the Python stubs of proto/torpor/v1/*.proto, or check they are current.

    python -m torpor.protogen          # write proto/torpor/v1/*_pb2*.py(i)
    python -m torpor.protogen --check  # exit 1 if the committed stubs differ from fresh ones

The generator is grpcio-tools at exactly GRPC_TOOLS_VERSION: generated code refuses a grpcio
runtime older than its generator, patch level included (1.84.2 stubs fail to import on
1.84.0), and the stubs it writes name that version, so another one would also fail `--check`.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent  # the repository's proto/ directory
PACKAGE_DIR = PROTO_ROOT / "torpor" / "v1"
GRPC_TOOLS_VERSION = "1.84.0"
"""The grpcio of the GPU hosts; the stubs need a grpcio and a protobuf at least as new as the
generator's (grpcio 1.84.0, protobuf 7.35.1)."""


def check_generator() -> None:
    """Refuse to run with any grpcio-tools other than GRPC_TOOLS_VERSION, saying which."""
    found = metadata.version("grpcio-tools")
    if found != GRPC_TOOLS_VERSION:
        raise SystemExit(
            f"torpor.protogen needs grpcio-tools=={GRPC_TOOLS_VERSION} (found {found}): stubs "
            f"from another generator name its version and refuse older grpcio runtimes; "
            f"install it with `pip install grpcio-tools=={GRPC_TOOLS_VERSION}`"
        )


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under torpor/v1 into `out_root`; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    if not sources:
        return []
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "torpor" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the stubs are current")
    args = parser.parse_args(argv)
    check_generator()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        names = {p.name for p in fresh}
        stale = [p.name for p in PACKAGE_DIR.glob("*_pb2*.py*") if p.name not in names]
        changed = [
            p.name
            for p in fresh
            if not (PACKAGE_DIR / p.name).exists()
            or not filecmp.cmp(p, PACKAGE_DIR / p.name, shallow=False)
        ]
        if args.check:
            if changed or stale:
                print(
                    f"generated stubs are out of date ({', '.join(changed + stale)}); "
                    "run `make proto` and commit the result",
                    file=sys.stderr,
                )
                return 1
            return 0
        for name in stale:
            (PACKAGE_DIR / name).unlink()
        for p in fresh:
            (PACKAGE_DIR / p.name).write_bytes(p.read_bytes())
        print(f"wrote {len(fresh)} files to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
