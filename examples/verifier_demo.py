"""Verifier demo: start the verifier service, score examples/verifier/samples.jsonl through
`nebula verify`, print one result per line and a summary, stop the service.

    python examples/verifier_demo.py [FILE.jsonl]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    samples = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples/verifier/samples.jsonl"
    port = free_port()
    address = f"127.0.0.1:{port}"
    print(f"starting verifier service on {address} ...", flush=True)
    server = subprocess.Popen([str(BIN / "nebula"), "verifier", "serve", "--port", str(port)],
                              cwd=ROOT, env=os.environ.copy())
    try:
        import grpc

        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=60)
        t0 = time.monotonic()
        out = subprocess.run([str(BIN / "nebula"), "verify", "--address", address, str(samples)],
                             capture_output=True, text=True, check=False)
        took = time.monotonic() - t0
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        print(f"\n{'id':<26} {'verifier':<10} {'status':<8} {'reward':>6}  reason")
        for r in rows:
            reason = (r["reason"] or "").replace("\n", " ")[:70]
            print(f"{r['id']:<26} {r['verifier']:<10} {r['status']:<8} {r['reward']:>6.2f}  {reason}")
        ok = sum(r["status"] == "ok" for r in rows)
        print(f"\n{len(rows)} items in {took:.2f}s: {ok} verified, "
              f"{sum(r['passed'] for r in rows)} passed, {len(rows) - ok} errors/timeouts")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    sys.exit(main())
