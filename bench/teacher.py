"""Teacher-service benchmark, measured side by side in one run (the machine is shared and noisy).

Teacher completion tokens/s through the gRPC service (a real `python -m teacher` child process
hosting a toy Qwen2 teacher) against an in-process forward of the same batches with the same code
path (`HostedTeacher.score`, the call the service's batcher makes, with the same
`max_batch_sequences` cap), in the bench process, with the same torch thread count. Target >= 0.85
cold.

Batches look like what on-policy distillation sends: P prompts x S samples, each sample sharing its
group's prompt (~8 tokens) with a distinct completion (~16 tokens). Every round uses fresh random
completions, so the service's cache cannot help a cold measurement.

Modes, each round (the order of the service and in-process sides alternates between rounds):
- inprocess:    `HostedTeacher.score` over the batch, in this process.
- cold (1 call): the whole batch in one TeacherLogprobs call, as a rollout worker sends it.
- warm (1 call): the same call again, answered from the service's LRU cache.
- cold (N calls): another fresh batch sent as one call per prompt group, all in flight at once,
  so the service's dynamic batching merges them; paired with its own in-process measurement.
- warm (N calls): the same N calls again (cache hits).

Ratios are medians of per-round ratios of adjacent measurements. The service's own forward time
(its `nebula_teacher_batch_seconds` histogram) is scraped around every service measurement to
split the service's wall time into forward compute and overhead.

Last line: `teacher service/inprocess cold=<ratio> warm=<ratio>` (the one-call modes).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402

from nebula.clients.teacher import TeacherClient, teacher_process  # noqa: E402

NAME = "toy-teacher"
FIRST_TOKEN = 3  # ids 0..2 are <pad>, </s>, <unk> in the toy char tokenizer


def build_teacher(root: Path, args: argparse.Namespace) -> Path:
    from nebula.toy_model import build_toy_model
    from nebula.config.job import ToyModelConfig

    cfg = ToyModelConfig(hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                         intermediate_size=4 * args.hidden,
                         max_position=max(64, 2 * (args.prompt_len + args.completion_len)),
                         seed=1)
    return build_toy_model(root / "teacher", cfg)


def make_batch(rng: np.random.Generator, args: argparse.Namespace, vocab: int
               ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """P groups of S (prompt_ids, completion_ids) sharing the group's prompt; lengths vary
    +-25% around the flags, as sampled completions do."""
    def length(mean: int) -> int:
        return int(rng.integers(max(1, round(mean * 0.75)), round(mean * 1.25) + 1))

    groups = []
    for _ in range(args.prompts):
        prompt = rng.integers(FIRST_TOKEN, vocab, length(args.prompt_len)).astype(np.int64)
        groups.append([(prompt, np.append(rng.integers(FIRST_TOKEN, vocab,
                                                       length(args.completion_len) - 1), 1)
                        .astype(np.int64))
                       for _ in range(args.samples)])
    return groups


def tokens(groups: list[list[tuple[np.ndarray, np.ndarray]]]) -> int:
    return sum(len(c) for g in groups for _, c in g)


def flat(groups: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [s for g in groups for s in g]


def inprocess_rate(teacher, groups, args) -> tuple[float, list]:
    seqs = flat(groups)
    t0 = time.perf_counter()
    out = teacher.score(seqs, args.top_k, args.max_batch_sequences)
    return tokens(groups) / (time.perf_counter() - t0), out


def as_lists(groups):
    """What a rollout worker holds: token ids as Python lists."""
    return [[(p.tolist(), c.tolist()) for p, c in g] for g in groups]


def service_rate(client: TeacherClient, pool: ThreadPoolExecutor | None, groups, ntok: int,
                 top_k: int) -> tuple[float, list]:
    """One call with every sequence (pool None), or one call per group, all in flight."""
    t0 = time.perf_counter()
    if pool is None:
        res = list(client.logprobs(NAME, [s for g in groups for s in g], top_k=top_k))
    else:
        calls = pool.map(lambda g: client.logprobs(NAME, g, top_k=top_k), groups)
        res = [r for rs in calls for r in rs]
    return ntok / (time.perf_counter() - t0), res


def forward_seconds(metrics_port: int) -> tuple[float, float]:
    """(sum of the service's batch forward seconds, batches run) from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
                                  ).read().decode()

    def sample(name: str) -> float:
        m = re.search(rf'^{name}\{{teacher="{NAME}"\}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return sample("nebula_teacher_batch_seconds_sum"), sample("nebula_teacher_batches_total")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds of the processes so far (all their threads)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def padded_tokens(lengths: list[int], cap: int, presorted: bool) -> int:
    """Padded tokens of HostedTeacher.score's forward passes (cap sequences each, sorted by
    length); presorted False: the batcher first cuts the request into windows of `cap` in arrival
    order and each window is sorted on its own (a single request, max_batch_tokens not binding)."""
    windows = [lengths] if presorted else [lengths[i:i + cap] for i in range(0, len(lengths), cap)]
    total = 0
    for w in windows:
        w = sorted(w, reverse=True)
        total += sum(len(w[i:i + cap]) * w[i] for i in range(0, len(w), cap))
    return total


def check_close(res, ref, top_k: int) -> float:
    """Largest |service - in-process| token log-prob over a batch."""
    err = 0.0
    for r, s in zip(res, ref):
        err = max(err, float(np.max(np.abs(np.asarray(r.logprobs, np.float32) - s.logprobs))))
        if top_k:
            err = max(err, float(np.max(np.abs(np.asarray(r.top_logprobs, np.float32)
                                               - s.top_logprobs))))
    return err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=8, help="mean prompt tokens")
    ap.add_argument("--completion-len", type=int, default=16, help="mean completion tokens")
    ap.add_argument("--top-k", type=int, default=0, help="top-k log-probs per token (0: none)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15, help="most rounds")
    ap.add_argument("--budget-s", type=float, default=90.0,
                    help="stop starting rounds after this many seconds of rounds (min 3 rounds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads on both sides (default: torch's default here)")
    ap.add_argument("--service-threads", type=int, default=None,
                    help="torch threads of the service only (default: --threads)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-batch-sequences", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    args = ap.parse_args()

    import torch

    from nebula.config.teacher import TeacherModelConfig
    from teacher.model import HostedTeacher

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    svc_threads = args.service_threads or threads
    env = {"OMP_NUM_THREADS": str(svc_threads), "MKL_NUM_THREADS": str(svc_threads)}

    rng = np.random.default_rng(0)
    r_cold = {"1": [], "N": []}
    r_warm = {"1": [], "N": []}
    rate: dict[str, list[float]] = {k: [] for k in
                                    ("inproc", "cold1", "warm1", "coldN", "warmN")}
    share: dict[str, list[float]] = {"cold1": [], "coldN": []}
    batches_per: dict[str, list[float]] = {"cold1": [], "coldN": []}
    overhead_ms: dict[str, list[float]] = {"cold1": [], "coldN": []}
    fwd_s: dict[str, list[float]] = {"cold1": [], "coldN": []}
    fwd_ratio: dict[str, list[float]] = {"cold1": [], "coldN": []}  # in-process s / service fwd s
    cpu_ratio: dict[str, list[float]] = {"1": [], "N": []}  # in-process CPU s / service CPU s
    err = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = build_teacher(Path(tmp), args)
        mcfg = {"name": NAME, "path": str(path), "device": "cpu", "dtype": "float32",
                "version": "bench", "max_batch_tokens": args.max_batch_tokens}
        teacher = HostedTeacher(TeacherModelConfig(**mcfg))
        vocab = teacher.vocab_size
        svc_cfg = {"teachers": [mcfg], "batch_wait_ms": args.batch_wait_ms,
                   "max_batch_sequences": args.max_batch_sequences, "cache_entries": 1 << 16,
                   "max_top_k": max(1, args.top_k)}
        print(f"teacher: toy Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {vocab}; "
              f"batch {args.prompts} prompts x {args.samples} samples, ~{args.prompt_len}+"
              f"~{args.completion_len} tokens, top_k {args.top_k}; torch threads: bench "
              f"{threads}, service {svc_threads}; batch_wait_ms {args.batch_wait_ms}, "
              f"max_batch_sequences {args.max_batch_sequences}; {os.cpu_count()} CPUs",
              flush=True)
        with teacher_process(Path(tmp) / "svc", svc_cfg, env=env) as srv, \
                TeacherClient(srv["address"], timeout_s=300) as client, \
                ThreadPoolExecutor(max_workers=args.prompts) as pool:
            mport = srv["metrics_port"]
            pids = (os.getpid(), srv["proc"].pid)
            # Warm both sides up (first forwards, allocator, gRPC channel), off the record.
            if True:
                g = make_batch(rng, args, vocab)
                inprocess_rate(teacher, g, args)
                service_rate(client, None, as_lists(g), tokens(g), args.top_k)
                g = make_batch(rng, args, vocab)
                service_rate(client, pool, as_lists(g), tokens(g), args.top_k)

            def svc(mode: str, pool_, lists, ntok_):
                f0, b0 = forward_seconds(mport)
                r, res = service_rate(client, pool_, lists, ntok_, args.top_k)
                f1, b1 = forward_seconds(mport)
                if mode in share:
                    share[mode].append((f1 - f0) * r / ntok_)  # forward s / wall s
                    overhead_ms[mode].append((ntok_ / r - (f1 - f0)) * 1000)
                    fwd_s[mode].append(f1 - f0)
                    batches_per[mode].append(b1 - b0)
                rate[mode].append(r)
                return r, res

            t_start = time.monotonic()
            pad = []
            for rnd in range(args.rounds):
                if rnd >= 3 and time.monotonic() - t_start > args.budget_s:
                    print(f"time budget spent after {rnd} rounds", flush=True)
                    break
                line = []
                for conc, pool_ in (("1", None), ("N", pool)):
                    g = make_batch(rng, args, vocab)
                    lists, ntok = as_lists(g), tokens(g)
                    if conc == "1":
                        lens = [len(p) + len(c) for p, c in flat(g)]
                        pad.append(padded_tokens(lens, args.max_batch_sequences, False)
                                   / padded_tokens(lens, args.max_batch_sequences, True))
                    # CPU seconds of both processes, side by side with wall time: unlike wall
                    # time they barely move when other jobs load the machine.
                    c0 = cpu_seconds(*pids)
                    if rnd % 2 == 0:
                        ri, ref = inprocess_rate(teacher, g, args)
                        c1 = cpu_seconds(*pids)
                        rc, res = svc(f"cold{conc}", pool_, lists, ntok)
                        c2 = cpu_seconds(*pids)
                        cpu_in, cpu_svc = c1 - c0, c2 - c1
                    else:
                        rc, res = svc(f"cold{conc}", pool_, lists, ntok)
                        c1 = cpu_seconds(*pids)
                        ri, ref = inprocess_rate(teacher, g, args)
                        c2 = cpu_seconds(*pids)
                        cpu_in, cpu_svc = c2 - c1, c1 - c0
                    cpu_ratio[conc].append(cpu_in / max(cpu_svc, 1e-9))
                    rw, res_w = svc(f"warm{conc}", pool_, lists, ntok)
                    assert not any(r.cache_hit for r in res), "cold call hit the cache"
                    assert all(r.cache_hit for r in res_w), "warm call missed the cache"
                    err = max(err, check_close(res, ref, args.top_k))
                    rate["inproc"].append(ri)
                    fwd_ratio[f"cold{conc}"].append(ntok / ri / fwd_s[f"cold{conc}"][-1])
                    r_cold[conc].append(rc / ri)
                    r_warm[conc].append(rw / ri)
                    line.append(f"[{'1 call' if conc == '1' else f'{args.prompts} calls'}] "
                                f"inproc {ri:,.0f} cold {rc:,.0f} warm {rw:,.0f}")
                print(f"round {rnd:2d} tok/s: " + "  ".join(line), flush=True)

    med = statistics.median
    print(f"\nmax |service - in-process| log-prob: {err:.2e}")
    print("median tokens/s: " + ", ".join(f"{k} {med(v):,.0f}" for k, v in rate.items()))
    for conc, label in (("1", "1 call per batch"), ("N", f"{args.prompts} concurrent calls")):
        m = f"cold{conc}"
        print(f"{label}: cold ratio {med(r_cold[conc]):.3f} "
              f"(range {min(r_cold[conc]):.2f}-{max(r_cold[conc]):.2f}), "
              f"warm ratio {med(r_warm[conc]):.2f}")
        print(f"  cold: service wall time in forward {med(share[m]):.0%}, overhead "
              f"{med(overhead_ms[m]):.1f} ms per batch ({med(batches_per[m]):.0f} forward batches),"
              f" in-process time / service forward time {med(fwd_ratio[m]):.3f}; "
              f"CPU-time ratio (in-process CPU s / service+client CPU s) "
              f"{med(cpu_ratio[conc]):.3f}")
    print(f"padded tokens of the service's forward passes for 1 call / in-process: "
          f"{med(pad):.3f}")
    print(f"teacher service/inprocess cold={med(r_cold['1']):.3f} warm={med(r_warm['1']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
