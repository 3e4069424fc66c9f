"""bench/gpu_check.py (b): one weight sync from the learner's process into an engine-shaped
bf16 copy of the model in a second process, over a flat bucket both sides agree on; checked by
an exact checksum of the received weights. Needs torch and transformers alone."""

from __future__ import annotations

import datetime
import time
from typing import Any

from gpu_check_model import build_model, model_config, sync


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


# -- (b) the learner side of the weight sync ----------------------------------------------


def weight_sync(named: list[tuple[str, Any]], device: Any, transports: list[str], rounds: int,
                inq: Any, outq: Any) -> dict[str, Any]:
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
