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
checksum differs or (on a GPU) a target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from typing import Any

MFU_TARGET = 0.40
SYNC_TARGET_S = 0.5

# Qwen2.5-0.5B's shape; the dry run's tiny one.
FULL_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=1024,
                  max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6)


def log(msg: str) -> None:
    print(msg, flush=True)


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


def model_config(shape: dict[str, Any], attn: str) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**shape, tie_word_embeddings=True, attn_implementation=attn,
                       use_cache=False)


def build_model(cfg: Any, device: Any, dtype: Any, seed: int) -> Any:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def flops_per_token(n_params: int, cfg: Any, seq: int) -> float:
    return 6.0 * n_params + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq


# -- the flat bucket both sides agree on -------------------------------------------------


def layout(named: list[tuple[str, Any]]) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """(name, offset, numel, shape) of each parameter in the flat bucket."""
    out, off = [], 0
    for name, p in named:
        out.append((name, off, p.numel(), tuple(p.shape)))
        off += p.numel()
    return out


def pack(named: list[tuple[str, Any]], bucket: Any) -> None:
    """Copy (and cast) every parameter into its place in the bucket."""
    import torch

    with torch.no_grad():
        off = 0
        for _, p in named:
            n = p.numel()
            bucket[off:off + n].copy_(p.detach().reshape(-1))
            off += n


def unpack(bucket: Any, params: dict[str, Any], lay: list[tuple[str, int, int, tuple]]) -> None:
    """The engine's load: each received tensor copied into its parameter in place."""
    import torch

    with torch.no_grad():
        for name, off, n, shape in lay:
            params[name].copy_(bucket[off:off + n].view(shape))


def checksum(tensors: list[Any], dtype: Any) -> int:
    """An exact, order-sensitive checksum of tensors as `dtype` (bitwise: int64 sums of the
    16-bit patterns, weighted by position and tensor index)."""
    import torch

    total = 0
    chunk = 1 << 24
    for i, t in enumerate(tensors):
        flat = t.detach().to(dtype).reshape(-1).view(torch.int16)
        s = 0
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk].to(torch.int64)
            w = torch.arange(start, start + part.numel(), device=part.device,
                             dtype=torch.int64) % 65521 + 1
            s += int((part * w).sum().item())
        total = (total * 1000003 + s + i) % (1 << 61)
    return total


# -- (b) the engine side: a second process -------------------------------------------------


def engine_main(shape: dict[str, Any], attn: str, device_type: str, transports: list[str],
                rounds: int, inq: Any, outq: Any) -> None:
    """The receiving process: an engine-shaped copy of the model (bf16, inference), loaded
    from the learner's bucket over each transport."""
    import torch

    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(0)
        cfg = model_config(shape, attn)
        model = build_model(cfg, device, torch.bfloat16, seed=12345)  # other weights
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        named = list(model.named_parameters())
        params = dict(named)
        lay = layout(named)
        numel = sum(n for _, _, n, _ in lay)
        outq.put(("ready", checksum([p for _, p in named], torch.bfloat16)))
        for transport in transports:
            if transport == "ipc":
                bucket = None
                for _ in range(rounds):
                    msg = inq.get()
                    if msg[0] == "bucket":  # first round: the shared bucket (IPC handle)
                        bucket = msg[1]
                    unpack(bucket, params, lay)
                    if device_type == "cuda":
                        torch.cuda.synchronize()
                    outq.put(("loaded", None))
                del bucket
            else:  # gloo: point-to-point from rank 0 (the learner)
                _, port = inq.get()
                store = torch.distributed.TCPStore("127.0.0.1", port, 2, False,
                                                   timeout=datetime.timedelta(seconds=60))
                pg = torch.distributed.ProcessGroupGloo(store, 1, 2,
                                                        datetime.timedelta(seconds=60))
                bucket = torch.empty(numel, dtype=torch.bfloat16)
                for _ in range(rounds):
                    pg.recv([bucket], 0, 0).wait()
                    unpack(bucket, params, lay)
                    outq.put(("loaded", None))
                del pg, store
            outq.put(("checksum", checksum([p for _, p in named], torch.bfloat16)))
        mem = torch.cuda.max_memory_allocated() if device_type == "cuda" else 0
        outq.put(("done", mem))
    except BaseException as e:  # noqa: BLE001 - the learner reports it
        import traceback

        outq.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


# -- (a) training ------------------------------------------------------------------------


class TorchTrainer:
    """Plain torch: bf16 parameters (or fp32 master weights under bf16 autocast) and fused
    AdamW."""

    name = "torch"

    def __init__(self, model: Any, lr: float, fp32_master: bool, fused: bool) -> None:
        import torch

        self.model = model
        self.fp32_master = fp32_master
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                                     fused=fused)

    def step(self, ids: Any) -> float:
        import torch

        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.fp32_master):
            loss = lm_loss(self.model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def weights(self) -> list[tuple[str, Any]]:
        return list(self.model.named_parameters())


class DeepSpeedTrainer:
    """DeepSpeed (bf16, ZeRO stage `zero_stage`, fp32 master weights in its optimizer) with
    torch's fused AdamW, as the learner configures it."""

    name = "deepspeed"

    def __init__(self, model: Any, lr: float, zero_stage: int, micro_batch: int) -> None:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "steps_per_print": 1 << 30,
            "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {
                "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                "torch_adam": True, "fused": True}},
        }
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                    config=config)
        self.model = self.engine.module

    def step(self, ids: Any) -> float:
        loss = lm_loss(self.engine, ids)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def weights(self) -> list[tuple[str, Any]]:
        return list(self.engine.module.named_parameters())


def lm_loss(model: Any, ids: Any) -> Any:
    """Next-token cross-entropy over the whole sequence (log-softmax in fp32)."""
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: pure torch
        return False
    return True


def setup_deepspeed_env(device_type: str) -> None:
    os.environ["DS_ACCELERATOR"] = device_type
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def make_trainer(args: argparse.Namespace, cfg: Any, device: Any, micro_batch: int) -> Any:
    import torch

    use_ds = args.backend == "deepspeed" or (args.backend == "auto" and deepspeed_available())
    if use_ds:
        setup_deepspeed_env(device.type)
        import deepspeed

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        model = build_model(cfg, device, torch.float32, seed=0)
        return DeepSpeedTrainer(model, args.lr, args.zero_stage, micro_batch)
    dtype = torch.float32 if args.fp32_master else torch.bfloat16
    model = build_model(cfg, device, dtype, seed=0)
    return TorchTrainer(model, args.lr, args.fp32_master, fused=True)


def train(args: argparse.Namespace, cfg: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """Train warm-up + timed steps, halving the micro-batch on CUDA OOM. Returns the trainer
    and the numbers."""
    import torch

    mb = args.micro_batch
    while True:
        trainer = None
        try:
            trainer = make_trainer(args, cfg, device, mb)
            trainer.model.train()
            if args.compile:
                trainer.model.compile()
            gen = torch.Generator(device=device).manual_seed(0)

            def batch() -> Any:
                return torch.randint(0, cfg.vocab_size, (mb, args.seq), device=device,
                                     generator=gen)

            for _ in range(args.warmup):
                trainer.step(batch())
            sync(device)
            losses = []
            t0 = time.perf_counter()
            for _ in range(args.steps):
                losses.append(trainer.step(batch()))
            sync(device)
            dt = time.perf_counter() - t0
            loss = float(torch.stack(losses).float().mean())
            return trainer, {"micro_batch": mb, "step_s": dt / args.steps, "loss": loss,
                             "tokens_per_s": mb * args.seq * args.steps / dt}
        except torch.cuda.OutOfMemoryError:
            if mb == 1:
                raise
            log(f"out of GPU memory at micro-batch {mb}: retrying with {mb // 2}")
        # Out of the except block: its traceback no longer holds the failed step's tensors.
        del trainer
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        mb //= 2


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# -- (b) the learner side of the weight sync ----------------------------------------------


def weight_sync(named: list[tuple[str, Any]], device: Any, transports: list[str], rounds: int,
                ctx: Any, inq: Any, outq: Any) -> dict[str, Any]:
    """Rounds of weight sync over each transport; the engine process is already loading
    its model. Returns per-transport round times and the checksum verdicts."""
    import torch

    lay = layout(named)
    numel = sum(n for _, _, n, _ in lay)
    sent = checksum([p for _, p in named], torch.bfloat16)
    results: dict[str, Any] = {"sent_checksum": sent}
    before = expect(outq, "ready")
    results["differs_before"] = before != sent
    bucket = torch.empty(numel, dtype=torch.bfloat16, device=device)
    if device.type == "cpu":
        bucket.share_memory_()
    for transport in transports:
        times = []
        if transport == "ipc":
            for r in range(rounds):
                t0 = time.perf_counter()
                pack(named, bucket)
                sync(device)  # the bucket is complete before the engine reads it
                inq.put(("bucket", bucket) if r == 0 else ("go", None))
                expect(outq, "loaded")
                times.append(time.perf_counter() - t0)
        else:
            store = torch.distributed.TCPStore("127.0.0.1", 0, 2, True,
                                               timeout=datetime.timedelta(seconds=60),
                                               wait_for_workers=False)
            inq.put(("port", store.port))
            pg = torch.distributed.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=60))
            host = bucket if device.type == "cpu" else torch.empty_like(bucket, device="cpu")
            for _ in range(rounds):
                t0 = time.perf_counter()
                pack(named, host)
                pg.send([host], 1, 0).wait()
                expect(outq, "loaded")
                times.append(time.perf_counter() - t0)
            del pg, store
        got = expect(outq, "checksum")
        results[transport] = {"round_s": times, "checksum_ok": got == sent}
    results["engine_peak_mem"] = expect(outq, "done")
    return results


def expect(q: Any, kind: str, timeout_s: float = 600.0) -> Any:
    msg = q.get(timeout=timeout_s)
    if msg[0] == "error":
        raise RuntimeError(f"the engine process failed: {msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"the engine process sent {msg[0]!r}, expected {kind!r}")
    return msg[1]


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

        res = weight_sync(named, device, transports, args.sync_rounds, ctx, inq, outq)
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
