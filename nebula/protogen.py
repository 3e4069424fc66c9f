"""Generate the Python stubs of proto/ into nebula/v1/ (or check that they are current).

    python -m nebula.protogen          # regenerate
    python -m nebula.protogen --check  # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = "nebula/v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto under proto/; returns the generated files."""
    from grpc_tools import protoc  # dev dependency, only needed here

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_root / OUT_PACKAGE).glob("*_pb2*.py*"))


def stale_files() -> list[str]:
    """Generated files that differ from, or are missing in, the committed nebula/v1/."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = {p.name for p in (ROOT / OUT_PACKAGE).glob("*_pb2*.py*")}
        out = []
        for f in fresh:
            mine = ROOT / OUT_PACKAGE / f.name
            if not mine.exists() or not filecmp.cmp(f, mine, shallow=False):
                out.append(f.name)
            committed.discard(f.name)
        return out + sorted(f"{name} (no .proto)" for name in committed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only check, exit 1 when stale")
    args = ap.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs: " + ", ".join(stale), file=sys.stderr)
            print("run: python -m nebula.protogen", file=sys.stderr)
            return 1
        print("generated stubs are current")
        return 0
    for f in generate(ROOT):
        print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
