"""Verifier benchmark, measured side by side in one run (the machine is shared and noisy).

1. Math verifications/s through the gRPC service (a real `python -m verifier` process with
   W pool workers) divided by W, against math-verify called in-process in one process on
   the same kind of items. Rounds alternate, and the ratio is the median of the per-round
   ratios of adjacent measurements, so drift on this shared machine hits both sides alike.
   Target >= 0.9.
2. Median latency a sandboxed code run adds over a plain subprocess running the same
   snippet with the same interpreter. Target <= 50 ms.

Last line: `verifier grpc/inprocess=<ratio> sandbox_overhead_ms=<ms>`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from procs import verifier_server  # noqa: E402

from nebula.clients.verifier import VerifierClient  # noqa: E402
from nebula.clients.verifier import Item  # noqa: E402


def math_items(n: int, seed: int) -> list[tuple[str, str]]:
    """Distinct (response, reference) pairs so no parse cache helps either side."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 999)
        form = rng.randrange(4)
        ref = f"\\frac{{{a}}}{{{b}}}"
        if form == 0:
            resp = f"Adding these up, the answer is \\boxed{{{a}/{b}}}."
        elif form == 1:
            resp = f"We get $x = \\frac{{{a}}}{{{b}}}$, so the final answer is $\\frac{{{a}}}{{{b}}}$."
        elif form == 2:
            resp = f"The answer is {a / b:.6f}"
        else:
            resp = f"Hence \\boxed{{\\frac{{{a + 1}}}{{{b}}}}}"
        out.append((resp, ref))
    return out


def inprocess_rate(items: list[tuple[str, str]]) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    t0 = time.perf_counter()
    for resp, ref in items:
        gold = parse(f"${ref}$", extraction_config=cfg, parsing_timeout=None)
        pred = parse(resp, extraction_config=cfg, parsing_timeout=None)
        verify(gold, pred, timeout_seconds=None)
    return len(items) / (time.perf_counter() - t0)


def service_rate(client: VerifierClient, items: list[tuple[str, str]], workers: int) -> float:
    batch = 32
    chunks = [[Item("math", r, g) for r, g in items[i:i + batch]]
              for i in range(0, len(items), batch)]
    t0 = time.perf_counter()
    # A few batches in flight keep every pool worker busy, as rollout workers do.
    with ThreadPoolExecutor(max_workers=2 * workers) as ex:
        results = [r for rs in ex.map(client.verify, chunks) for r in rs]
    took = time.perf_counter() - t0
    bad = [r for r in results if r.status != "ok"]
    assert not bad, bad[:3]
    return len(items) / took


async def sandbox_latencies(runs: int) -> tuple[list[float], list[float]]:
    from nebula.config import SandboxConfig
    from nebula.sandbox import Sandbox

    cfg = SandboxConfig()
    sandbox = Sandbox(cfg)
    why = await sandbox.aprobe()
    if why:
        raise SystemExit(f"sandbox unavailable: {why}")
    snippet = b"print(sum(range(1000)))\n"
    plain, boxed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "snippet.py"
        script.write_bytes(snippet)
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([cfg.python, str(script)], capture_output=True, check=True)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res = await sandbox.run({"snippet.py": snippet}, ["python", "snippet.py"], b"", 10.0)
            boxed.append(time.perf_counter() - t0)
            assert res.exit_code == 0 and res.stdout.strip() == b"499500", res
    return plain, boxed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=300, help="math items per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--workers", type=int, default=1, help="service pool workers")
    ap.add_argument("--sandbox-runs", type=int, default=30)
    args = ap.parse_args()

    inproc, service = [], []
    with tempfile.TemporaryDirectory() as tmp, \
            verifier_server(Path(tmp), {"workers": args.workers, "item_timeout_s": 60}) as srv, \
            VerifierClient(srv["address"]) as client:
        service_rate(client, math_items(64, seed=999), args.workers)  # warm the workers
        inprocess_rate(math_items(64, seed=998))
        for r in range(args.rounds):
            items = math_items(args.items, seed=r)
            # Alternate which side goes first, so neither always runs on a warmer machine.
            if r % 2:
                inproc.append(inprocess_rate(math_items(args.items, seed=100 + r)))
                service.append(service_rate(client, items, args.workers) / args.workers)
            else:
                service.append(service_rate(client, items, args.workers) / args.workers)
                inproc.append(inprocess_rate(math_items(args.items, seed=100 + r)))
            print(f"round {r}: service {service[-1]:.0f}/s per worker, "
                  f"in-process {inproc[-1]:.0f}/s", flush=True)
    ratio = statistics.median(s / i for s, i in zip(service, inproc))

    plain, boxed = asyncio.run(sandbox_latencies(args.sandbox_runs))
    overhead_ms = (statistics.median(boxed) - statistics.median(plain)) * 1000
    print(f"sandbox: plain subprocess median {statistics.median(plain) * 1000:.1f} ms, "
          f"sandboxed median {statistics.median(boxed) * 1000:.1f} ms ({args.sandbox_runs} runs)")
    print(f"math: service {statistics.median(service):.0f}/s per worker "
          f"(workers={args.workers}), in-process {statistics.median(inproc):.0f}/s")
    print(f"verifier grpc/inprocess={ratio:.2f} sandbox_overhead_ms={overhead_ms:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
