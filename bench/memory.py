"""Learner memory and throughput at real sizes: one GRPO step through
`DSLearnerEngine.grpo_step` (the real code path: collation, micro-batching, no-grad pass for
the old log-probs, chunked log-probs, backward, AdamW step) on a random-init model of
SmolLM2-135M's shape (Llama: hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536,
tied embeddings) at vocab 49,152 (SmolLM2's) and 151,669 (Qwen3's).

Memory. Each case runs in a fresh subprocess: imports, then the process group, then
baseline = the process's RSS; then the engine is built (the model loaded from a safetensors
dir written beforehand by another process), a tiny GRPO step creates the Adam states (torch
creates them lazily, at the first step) and the measured GRPO step runs with them, as every
step after the first does.
peak = ru_maxrss - baseline. ru_maxrss is the kernel's high-water mark of resident memory: it
counts everything the process really holds - tensors, allocator caches, memory glibc keeps
after free() - and nothing can hide from it; torch has no CPU allocator statistics to use
instead. The baseline is taken after the imports (the engine's modules included) and the
process group, when RSS is at its highest so far. glibc:
by default the children run with `MALLOC_MMAP_THRESHOLD_=1048576` (each block >= 1 MiB - every
activation and logits chunk - is its own mmap, returned to the OS by free(); glibc's default
*dynamic* threshold climbs to 32 MiB after the first large free and then serves such blocks
from the heap, where freed memory stays resident) and `MALLOC_ARENA_MAX=2`; `--glibc default`
measures without them. Both are stated in the output; the job's learner actor runs with the
same settings (learner.dist_env.MALLOC_ENV).

floor = what the configuration must hold: weights + gradients + optimizer states, counted from
the engine (parameters of the module in the model dtype, one gradient per parameter in the
model dtype, and every tensor of the optimizer: the AdamW exp_avg/exp_avg_sq, plus for bf16 the
fp32 master weights and fp32 gradient buffers of DeepSpeed's BF16 optimizer). fp32: 16 bytes
per parameter, bf16: 20.

ZeRO stage: 0 by default. On one rank ZeRO-1/2/3 partition nothing away (the whole model is
the one partition) but keep extra copies: ZeRO-1/2 an fp32 flat copy of the weights for the
optimizer (+4 bytes/param even in fp32) and gradient reduction buckets, ZeRO-3 its own flat
fp32 partitions. ZeRO-0 with fp32 holds exactly weights + grads + Adam states (`--zero` to
measure another stage).

Memory settings: micro-batch 8 sequences of 64 prompt + 1,024 completion tokens (one
micro-batch), activation checkpointing on, `logits_chunk` positions of full-vocabulary
logits at a time (`--chunk`); the LM head fused (the learner's: gradients by hand, one
weight-gradient buffer) and autograd's checkpointed chunks side by side (`--head`).

Throughput: learner tokens/s (trained tokens per second of grpo_step wall time) on
`--tp-seqs` sequences with completions uniformly 64-1,024 tokens (vocab 49,152), token-budget
micro-batches of `--tp-budget` tokens, padded vs packed, fp32 vs bf16 (`model.dtype`: bf16
weights over DeepSpeed's fp32 master copy) vs fp32 weights under bf16 autocast
(`learner.autocast`), and packed with shared prompts (groups of 4 share their 64-token
prompt); activation checkpointing on. `--threads` torch threads (default 1: this machine's
learner has one core). `--skip-memory`: the throughput rows only.

Last line: `memory peak/floor_49k=<r> peak/floor_151k=<r>`. `--quick`: short sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
VOCABS = {"49k": 49_152, "151k": 151_669}
from learner.dist_env import MALLOC_ENV as TUNED_GLIBC  # noqa: E402 - the learner actor's


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_model(path: Path, vocab: int) -> None:
    """A random-init model of SmolLM2-135M's shape with `vocab` tokens, saved to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                      tie_word_embeddings=True, max_position_embeddings=8192,
                      rope_theta=100000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)


def make_groups(n_seqs: int, prompt: int, completion: tuple[int, int], vocab: int,
                seed: int = 0, per_group: int = 4) -> list[Any]:
    """GRPO groups of `per_group` samples, random tokens, behaviour log-probs and advantages;
    completion lengths uniform in `completion` (inclusive)."""
    from nebula.v1.trajectory_pb2 import TrajectoryGroup

    rng = random.Random(seed)
    groups = []
    for g in range(0, n_seqs, per_group):
        group = TrajectoryGroup(group_id=f"g{g}",
                                prompt_ids=[rng.randrange(3, vocab) for _ in range(prompt)])
        for j in range(min(per_group, n_seqs - g)):
            c = rng.randint(*completion)
            group.samples.add(completion_ids=[rng.randrange(3, vocab) for _ in range(c)],
                              behaviour_logprobs=[-rng.uniform(5, 12) for _ in range(c)],
                              policy_versions=[0] * c, advantage=1.0 if j % 2 else -1.0)
        groups.append(group)
    return groups


def _state_bytes(engine: Any) -> dict[str, int]:
    """Bytes the configuration holds: weights, gradients, optimizer tensors."""
    import torch

    params = list(engine.module.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    opt = engine.optimizer
    seen: set[int] = set()
    held = 0

    def add(t: Any) -> None:
        nonlocal held
        if torch.is_tensor(t) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()

    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        for t in state.values():
            add(t)
    master = 0
    if inner is not opt:  # DeepSpeed's bf16 wrapper: fp32 master weights and gradients
        for g in inner.param_groups:
            for p in g["params"]:
                master += p.numel() * p.element_size()
        for buf in getattr(opt, "fp32_groups_gradients_flat", []):
            master += buf.numel() * buf.element_size()
    return {"params": sum(p.numel() for p in params), "weights": weights, "grads": weights,
            "optimizer_states": held, "master_and_fp32_grads": master}


def child(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(int(case["threads"]))
    # Code first (imports are not the learner's memory): everything the engine imports.
    import deepspeed
    import deepspeed.runtime.bf16_optimizer  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import learner.logprobs  # noqa: F401
    import learner.packing  # noqa: F401
    from learner.dist_env import setup_distributed_env
    from learner.ds_engine import DSLearnerEngine
    from nebula.config.job import LearnerConfig

    if case.get("head") == "checkpointed":  # the autograd path, for the side-by-side figure
        learner.logprobs._fusable = lambda head: False
    backend = setup_distributed_env("cpu")
    deepspeed.init_distributed(dist_backend=backend)

    groups = make_groups(case["seqs"], case["prompt"], tuple(case["completion"]), case["vocab"])
    warm = make_groups(2, 8, (8, 8), case["vocab"], seed=1, per_group=2)
    cfg = LearnerConfig(zero_stage=case["zero"], device="cpu", lr=1e-5, micro_batch=case["seqs"],
                        max_tokens_per_micro_batch=case.get("budget"),
                        packing=case.get("packing", True),
                        share_prompts=case.get("share", False),
                        autocast="bfloat16" if case.get("autocast") else "none",
                        activation_checkpointing=case["ckpt"], logits_chunk=case["chunk"])
    base = _rss()
    t0 = time.perf_counter()
    eng = DSLearnerEngine(case["model"], cfg, dtype=case["dtype"],
                          mlp_tile_tokens=case.get("mlp_tile"))
    init_s = time.perf_counter() - t0
    steps = []
    for i in range(case["steps"]):
        if case.get("warmup") and i == 0:
            eng.grpo_step(warm)  # one-time costs (Adam state, kernels) out of the measurement
        steps.append(eng.grpo_step(groups))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    held = _state_bytes(eng)
    floor = held["weights"] + held["grads"] + held["optimizer_states"]
    if case["dtype"] != "float32":  # mixed precision's fp32 master weights and gradients
        floor += held["master_and_fp32_grads"]
    last = steps[-1]
    return {"peak_mib": peak / MiB, "floor_mib": floor / MiB, "ratio": peak / floor,
            "held": held, "init_s": init_s, "step_s": [s["step_time_s"] for s in steps],
            "tokens_per_s": last["tokens_per_s"], "tokens": last["tokens"],
            "pad_frac": last["pad_frac"], "micro_batches": last["micro_batches"],
            "loss": last["loss"], "grad_norm": last["grad_norm"],
            "real_tokens": sum(len(g.prompt_ids) * len(g.samples)
                               + sum(len(s.completion_ids) for s in g.samples) for g in groups)}


def run_case(case: dict[str, Any], glibc: str) -> dict[str, Any]:
    env = dict(os.environ)
    if glibc == "tuned":
        env.update(TUNED_GLIBC)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.setdefault("OMP_NUM_THREADS", str(case["threads"]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env,
                          cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"case failed (rc {proc.returncode}): {case}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short sequences (smoke run)")
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--chunk", type=int, default=0,
                    help="logits_chunk (default: 256 at vocab 49k, 64 at 151k: ~10M logits a chunk)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the memory cases")
    ap.add_argument("--no-ckpt", action="store_true", help="memory cases without activation "
                    "checkpointing")
    ap.add_argument("--budget", type=int, default=None,
                    help="max_tokens_per_micro_batch of the memory cases (default: none, the "
                    "8 sequences are one micro-batch)")
    ap.add_argument("--only", choices=list(VOCABS), help="one vocabulary only")
    ap.add_argument("--mlp-tile", type=int, default=2048,
                    help="DSLearnerEngine mlp_tile_tokens (0: MLPs not tiled)")
    ap.add_argument("--head", default="both", choices=["fused", "checkpointed", "both"],
                    help="LM head path of the memory cases: the learner's (fused: gradients "
                    "by hand, one weight-gradient buffer), autograd's checkpointed chunks, or "
                    "both side by side (the last line reports the fused one)")
    ap.add_argument("--glibc", default="tuned", choices=["tuned", "default"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tp-seqs", type=int, default=8)
    ap.add_argument("--tp-budget", type=int, default=4096)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true", help="throughput rows only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    prompt, completion = (16, 128) if args.quick else (64, 1024)
    tp_completion = (16, 128) if args.quick else (64, 1024)
    tp_budget = 512 if args.quick else args.tp_budget
    work = Path(tempfile.mkdtemp(prefix="nebula_bench_memory_"))
    ratios: dict[str, float] = {}
    try:
        for name, vocab in VOCABS.items():
            # --skip-memory: only the 49k model, which the throughput rows use
            if (args.only and name != args.only) or (args.skip_memory and name != "49k"):
                continue
            model = work / name
            subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                            "from bench.memory import build_model; from pathlib import Path;"
                            "build_model(Path(sys.argv[2]), int(sys.argv[3]))",
                            str(ROOT), str(model), str(vocab)], check=True, cwd=ROOT,
                           capture_output=True)
            chunk = args.chunk or (256 if vocab < 100_000 else 64)
            peaks = {}
            heads = ("checkpointed", "fused") if args.head == "both" else (args.head,)
            for head in () if args.skip_memory else heads:
                case = {"model": str(model), "vocab": vocab, "seqs": 8, "prompt": prompt,
                        "completion": [completion, completion], "zero": args.zero,
                        "dtype": args.dtype, "ckpt": not args.no_ckpt, "chunk": chunk,
                        "threads": args.threads, "steps": 1, "warmup": True,
                        "budget": args.budget, "mlp_tile": args.mlp_tile or None, "head": head}
                r = run_case(case, args.glibc)
                peaks[head] = r["peak_mib"]
                if head == "fused" or args.head != "both":
                    ratios[name] = r["ratio"]
                h = r["held"]
                print(f"vocab {vocab:,} ({h['params'] / 1e6:.1f}M params), ZeRO-{args.zero} "
                      f"{args.dtype}, 8 x ({prompt} + {completion}) tokens in "
                      f"{r['micro_batches']:.0f} micro-batch(es), "
                      f"activation checkpointing {'on' if case['ckpt'] else 'off'} (MLP tiles "
                      f"{case['mlp_tile'] or 'off'}), logits_chunk {chunk}, {head} head, "
                      f"glibc {args.glibc}: peak {r['peak_mib']:,.0f} MiB, "
                      f"floor {r['floor_mib']:,.0f} MiB (weights {h['weights'] / MiB:,.0f} + "
                      f"grads {h['grads'] / MiB:,.0f} + optimizer "
                      f"{h['optimizer_states'] / MiB:,.0f} + master/fp32 grads "
                      f"{h['master_and_fp32_grads'] / MiB:,.0f}) -> peak/floor "
                      f"{r['ratio']:.3f}; step time {r['step_s'][-1]:.0f} s", flush=True)
            if len(peaks) == 2:
                print(f"vocab {vocab:,}: fused head peak {peaks['fused']:,.0f} MiB vs "
                      f"checkpointed {peaks['checkpointed']:,.0f} MiB "
                      f"({peaks['fused'] - peaks['checkpointed']:+,.0f} MiB)", flush=True)
        tps: dict[tuple[str, bool, bool, bool], float] = {}
        if not args.skip_throughput and not args.only:
            model = work / "49k"
            # (model dtype, packing, shared prompts, bf16 autocast over fp32 weights)
            for dtype, packing, share, cast in (
                    ("float32", False, False, False), ("float32", True, False, False),
                    ("float32", True, True, False), ("bfloat16", False, False, False),
                    ("bfloat16", True, False, False), ("float32", True, False, True)):
                case = {"model": str(model), "vocab": VOCABS["49k"], "seqs": args.tp_seqs,
                        "prompt": prompt, "completion": list(tp_completion),
                        "zero": args.zero, "dtype": dtype, "ckpt": True, "chunk": 256,
                        "threads": args.threads, "steps": 1, "warmup": True,
                        "budget": tp_budget, "packing": packing, "share": share,
                        "autocast": cast, "mlp_tile": args.mlp_tile or None}
                r = run_case(case, args.glibc)
                tps[(dtype, packing, share, cast)] = r["tokens_per_s"]
                layout = ("packed, shared prompts" if share else "packed") if packing \
                    else "padded"
                print(f"throughput {dtype}{' + bf16 autocast' if cast else ''} {layout}: "
                      f"{r['tokens_per_s']:.1f} trained tok/s ({r['tokens']:.0f} trained "
                      f"tokens, {r['real_tokens']} with prompts, {r['micro_batches']:.0f} "
                      f"micro-batches of <= {tp_budget} tokens, padding "
                      f"{r['pad_frac']:.1%}, step {r['step_s'][-1]:.1f} s, peak "
                      f"{r['peak_mib']:,.0f} MiB)", flush=True)
            f32, b16 = (tps[("float32", True, False, False)],
                        tps[("float32", False, False, False)]), \
                (tps[("bfloat16", True, False, False)], tps[("bfloat16", False, False, False)])
            shared, cast = tps[("float32", True, True, False)], tps[("float32", True, False, True)]
            print(f"learner tokens/s packed/padded: fp32 {f32[0] / f32[1]:.2f}x, bf16 "
                  f"{b16[0] / b16[1]:.2f}x; bf16/fp32 (packed) {b16[0] / f32[0]:.2f}x; bf16 "
                  f"autocast/fp32 (packed) {cast / f32[0]:.2f}x; shared prompts/packed (fp32) "
                  f"{shared / f32[0]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("memory " + " ".join(f"peak/floor_{k}={v:.3f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
