"""One-GPU check of the learner's speed and of a weight sync, in a few minutes, with torch and
transformers alone (no vLLM, Ray or DeepSpeed needed; nothing downloaded).

(a) Learner MFU: a random-init Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14
    heads, 2 KV heads, MLP 4864, vocab 151936, tied embeddings) trains a few steps in bf16
    with torch's fused AdamW (or DeepSpeed, when it happens to be importable) on random
    tokens at seq 2048. MFU = achieved model FLOPs / the GPU's peak dense bf16 FLOPs, with
        model FLOPs per token = 6 N + 12 L d T
    (N: parameters, the tied embedding counted once, as the LM head's matmul; L layers,
    d hidden size, T sequence length: attention scores and values counted in full,
    non-causal, as PaLM and torchtitan count them), achieved = that x trained tokens/s.
    Peak: 989 TFLOP/s for H100 SXM and H200 (756 for H100 PCIe), or --peak-tflops.
    Target >= 40%.
(b) One weight sync: the learner's full state dict (cast to the engine's dtype) moves into
    a second process holding an engine-shaped bf16 copy of the model, which copies it into
    its parameters in place (`copy_`). On a GPU through CUDA IPC (torch.multiprocessing
    shares one flat bucket between the processes: NCCL refuses two ranks on one device);
    the dry run also sends it with gloo between two CPU processes. Verified by a checksum
    of the received weights against the sender's (and a mismatch before the sync).
    Target <= 0.5 s.
(c) Peak GPU memory of the learner process (torch.cuda.max_memory_allocated).

    bench/gpu_check.sh                 # on one CUDA GPU (exit 2 without one)
    bench/gpu_check.sh --dry-run       # tiny model on CPU: the same code paths, < 1 min

The last line: `gpu_check mfu=<pct> weight_sync_s=<s> peak_mem_gib=<g>`. Exit 1 when the
checksum differs or (on a GPU) a target is missed. (a) lives in gpu_check_train.py, (b) in
gpu_check_sync.py, the model both build in gpu_check_model.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from gpu_check_model import log, model_config
from gpu_check_sync import engine_main, weight_sync
from gpu_check_train import train

MFU_TARGET = 0.40
SYNC_TARGET_S = 0.5

# Qwen2.5-0.5B's shape; the dry run's tiny one.
FULL_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=1024,
                  max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6)


def peak_flops(name: str, override_tflops: float | None) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of the GPU named `name` (no sparsity)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    n = name.upper()
    if "H200" in n or "GH200" in n:
        return 989e12, "H200"
    if "H100" in n:
        if "PCIE" in n:
            return 756e12, "H100 PCIe"
        return 989e12, "H100 SXM"
    if "A100" in n:
        return 312e12, "A100"
    return None, "unknown GPU: pass --peak-tflops"


def flops_per_token(n_params: int, cfg: Any, seq: int) -> float:
    return 6.0 * n_params + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny model on CPU, same code paths (sync: shared memory and gloo)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s of the GPU (default: from its name)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (2048; dry: 128)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per step (default 8 on a GPU, halved on OOM; dry: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (8; dry: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (3; dry: 1)")
    ap.add_argument("--sync-rounds", type=int, default=3,
                    help="weight-sync rounds (the first also shares the bucket)")
    ap.add_argument("--backend", choices=["auto", "torch", "deepspeed"], default="auto",
                    help="auto: DeepSpeed when importable, else plain torch")
    ap.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2],
                    help="DeepSpeed ZeRO stage")
    ap.add_argument("--fp32-master", action="store_true",
                    help="torch backend: fp32 parameters and optimizer, bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (transformers)")
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args(argv)
    dry = args.dry_run
    for k, full, tiny in (("seq", 2048, 128), ("micro_batch", 8, 2), ("steps", 8, 2),
                          ("warmup", 3, 1)):
        if getattr(args, k) is None:
            setattr(args, k, tiny if dry else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"gpu_check: needs torch and transformers: {e}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): this check "
              "needs one NVIDIA GPU; `--dry-run` runs its code paths on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = torch.cuda.get_device_name(0)
        peak, peak_src = peak_flops(gpu, args.peak_tflops)
    else:
        gpu = "CPU (dry run)"
        peak, peak_src = ((args.peak_tflops * 1e12, "--peak-tflops") if args.peak_tflops
                          else (None, "none on CPU"))
    shape = TINY_SHAPE if args.dry_run else FULL_SHAPE
    cfg = model_config(shape, args.attn)
    transports = ["ipc", "gloo"] if args.dry_run else ["ipc"]
    log(f"gpu_check: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}"
        f"{'; DRY RUN (tiny model on CPU)' if args.dry_run else ''}")

    # The engine process starts first: it builds its copy while the learner trains.
    ctx = torch.multiprocessing.get_context("spawn")
    inq, outq = ctx.Queue(), ctx.Queue()
    engine = ctx.Process(target=engine_main, name="gpu_check-engine", daemon=True,
                         args=(shape, args.attn, device.type, transports, args.sync_rounds,
                               inq, outq))
    engine.start()
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer, tr = train(args, cfg, device)
        named = trainer.weights()
        n_params = sum(p.numel() for _, p in named)
        fpt = flops_per_token(n_params, cfg, args.seq)
        achieved = fpt * tr["tokens_per_s"]
        mfu = achieved / peak if peak else float("nan")
        if trainer.name == "deepspeed":
            how = f"DeepSpeed ZeRO-{args.zero_stage}, bf16, fp32 master weights"
        elif args.fp32_master:
            how = "pure torch, fp32 master weights and AdamW states, bf16 autocast"
        else:
            how = "pure torch, bf16 parameters and AdamW states"
        log(f"learner: {how}; fused torch AdamW; attention {cfg._attn_implementation}"
            f"{'; torch.compile' if args.compile else ''}")
        log(f"model: Qwen2 hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV, MLP "
            f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, tied; N = {n_params:,} params")
        log(f"train: seq {args.seq} x micro-batch {tr['micro_batch']}, {args.steps} timed steps "
            f"after {args.warmup}: {tr['step_s'] * 1e3:.1f} ms/step, "
            f"{tr['tokens_per_s']:,.0f} tokens/s, loss {tr['loss']:.3f}")
        log(f"MFU: model FLOPs/token = 6 N + 12 L d T = 6 x {n_params:,} + 12 x "
            f"{cfg.num_hidden_layers} x {cfg.hidden_size} x {args.seq} = {fpt:.4g}; achieved "
            f"{achieved / 1e12:.1f} TFLOP/s / peak "
            f"{(f'{peak / 1e12:.0f} TFLOP/s ({peak_src})') if peak else peak_src} = "
            f"{mfu * 100:.1f}%")

        res = weight_sync(named, device, transports, args.sync_rounds, inq, outq)
        engine.join(timeout=60)
        sync_s = max(max(res[t]["round_s"]) for t in transports)
        ok = res["differs_before"] and all(res[t]["checksum_ok"] for t in transports)
        for t in transports:
            how = ("CUDA IPC (one shared bf16 bucket)" if t == "ipc" and device.type == "cuda"
                   else "shared memory (one shared bf16 bucket)" if t == "ipc"
                   else "gloo send/recv between 2 CPU processes")
            rounds = ", ".join(f"{x:.4f}" for x in res[t]["round_s"])
            first = " (the first also shares the bucket)" if t == "ipc" else ""
            log(f"weight sync [{how}]: {n_params * 2 / 2**20:.1f} MiB, rounds of {rounds} s"
                f"{first}; checksum {'matches' if res[t]['checksum_ok'] else 'DIFFERS'}")
        log(f"weight sync: engine weights differed before the sync: {res['differs_before']}; "
            f"sender checksum {res['sent_checksum']:#x}")
        peak_mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        log(f"memory: learner peak {peak_mem / 2**30:.2f} GiB, engine process peak "
            f"{res['engine_peak_mem'] / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)")
    finally:
        if engine.is_alive():
            engine.terminate()
            engine.join(timeout=10)

    failed = [] if ok else ["weight checksum"]
    if not args.dry_run:
        if not (mfu >= MFU_TARGET):
            failed.append(f"MFU {mfu * 100:.1f}% < {MFU_TARGET * 100:.0f}%")
        if not sync_s <= SYNC_TARGET_S:
            failed.append(f"weight sync {sync_s:.3f} s > {SYNC_TARGET_S} s")
    log("targets: " + ("all met" if not failed else "MISSED: " + "; ".join(failed))
        + (" (dry run: only the checksum counts)" if args.dry_run else ""))
    mfu_txt = "nan" if math.isnan(mfu) else f"{mfu * 100:.1f}"
    log(f"gpu_check mfu={mfu_txt} weight_sync_s={sync_s:.4f} "
        f"peak_mem_gib={peak_mem / 2**30:.2f}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
