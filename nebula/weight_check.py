"""Weight-sync verification: the two failures most reported against RL frameworks are weights
that are silently not updated and a sync that hangs forever. This module holds what both
sides of a sync need to rule them out.

- `blob_fingerprint(blob)`: a digest of the published safetensors bytes, computed by the
  learner when it publishes (`WeightStore.publish(..., fingerprint)`) and checked by the
  rollout worker before it loads the blob (`check_blob`): a corrupted or mixed-up blob is
  refused, never loaded. xxh3-128 when `xxhash` is importable (~0.05 s for 270 MB on this
  machine), else SHA-256 (~0.4 s); the algorithm is part of the string
  (`"xxh3_128:..."`, `"sha256:..."`), so a checker recomputes with the producer's choice.
- Probes: a few tensors whose names vLLM does not fuse or rename (`PROBE_NAMES`: the input
  embedding, an untied LM head, the final norm), of which 2-D ones are cut to every `step`-th
  row (about `PROBE_ROWS` rows, the same global rows on both sides). After a load the engine
  reports a digest of what it holds for each probe (`probe_report`, in its own dtype and, for
  a vocabulary shard of a tensor-parallel engine, over the rows of its shard); `verify_probes`
  compares them with the same rows of the weights that were sent (`blob_probes` from a blob,
  `select_probes` from a state dict), cast to the engine's dtype. Casts round to nearest
  even on every device, as the engines' own loaders do, so the comparison is exact.
- `sync_timeout_s()`: every fetch or transfer of weights waits at most this long
  (`NEBULA_WEIGHT_SYNC_TIMEOUT_S`, default 300 s) and then raises `WeightSyncError`.

Light to import (no torch until a function needs it): `nebula` must stay light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch

TIMEOUT_ENV = "NEBULA_WEIGHT_SYNC_TIMEOUT_S"
DEFAULT_SYNC_TIMEOUT_S = 300.0
# Hugging Face names that vLLM keeps as they are (q/k/v and gate/up are fused, linear layers
# are sharded by tensor parallelism; these are either replicated or sharded by vocabulary rows).
PROBE_NAMES = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
PROBE_ROWS = 256  # rows of a 2-D probe that are compared (every step-th)


class WeightSyncError(RuntimeError):
    """Weights could not be synced, or were not what the learner published: the engine must
    not generate with them."""


class WeightSyncTimeout(WeightSyncError):
    """A weight fetch or transfer did not finish within `sync_timeout_s()`."""


def sync_timeout_s() -> float:
    """Seconds any weight fetch / transfer may take (`NEBULA_WEIGHT_SYNC_TIMEOUT_S`)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_SYNC_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be > 0")
    return value


# ------------------------------------------------------------------------------ digests


def _default_algo() -> str:
    try:
        import xxhash  # noqa: F401

        return "xxh3_128"
    except ImportError:
        return "sha256"


def _hasher(algo: str) -> Any:
    if algo == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise WeightSyncError("fingerprint algorithm xxh3_128 needs the xxhash package, "
                                  "which this process lacks") from None
        return xxhash.xxh3_128()
    if algo in ("sha256", "blake2b"):
        return hashlib.new(algo)
    raise WeightSyncError(f"unknown fingerprint algorithm {algo!r}")


def blob_fingerprint(blob: bytes | bytearray | memoryview, algo: str | None = None) -> str:
    """`"<algo>:<hex digest>"` of the bytes (default: xxh3_128 if available, else sha256)."""
    algo = algo or _default_algo()
    h = _hasher(algo)
    h.update(memoryview(blob))
    return f"{algo}:{h.hexdigest()}"


def check_blob(blob: bytes | bytearray | memoryview, expected: str | None, version: int) -> None:
    """Raise `WeightSyncError` unless the blob's fingerprint is `expected` (None: unchecked)."""
    if expected is None:
        return
    algo = expected.split(":", 1)[0] if ":" in expected else "sha256"
    got = blob_fingerprint(blob, algo)
    if got != expected:
        raise WeightSyncError(
            f"weights of version {version} are corrupted: the fetched blob ({len(blob)} bytes) "
            f"has fingerprint {got}, the learner published {expected}; not loading them")


def tensor_digest(t: torch.Tensor, algo: str = "sha256") -> str:
    """Digest of a tensor's dtype, shape and bytes (any device; copied to the CPU)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    h = _hasher(algo)
    h.update(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------- probes


def probe_step(rows: int) -> int:
    """Row stride of a 2-D probe of `rows` rows: about PROBE_ROWS rows are compared."""
    return max(1, math.ceil(rows / PROBE_ROWS))


def select_probes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The probe tensors of a (Hugging Face-named) state dict, 2-D ones cut to every
    `probe_step`-th row, detached CPU copies."""
    out: dict[str, Any] = {}
    for name in PROBE_NAMES:
        t = state.get(name)
        if t is None:
            continue
        t = t.detach()
        if t.dim() == 2:
            t = t[::probe_step(t.shape[0])]
        out[name] = t.to("cpu", copy=True).contiguous()
    return out


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def blob_probes(blob: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """`select_probes` of a safetensors blob, reading only the probes' rows (no full parse)."""
    import torch

    view = memoryview(blob)
    if len(view) < 8:
        raise WeightSyncError("the weights blob is not safetensors (shorter than its header)")
    (n,) = struct.unpack("<Q", view[:8])
    try:
        header = json.loads(bytes(view[8:8 + n]))
    except ValueError as e:
        raise WeightSyncError(f"the weights blob is not safetensors: {e}") from None
    base = 8 + n
    out: dict[str, Any] = {}
    for name in PROBE_NAMES:
        info = header.get(name)
        if info is None:
            continue
        dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
        shape = list(info["shape"])
        begin, end = info["data_offsets"]
        data = view[base + begin:base + end]
        if len(shape) == 2 and shape[0] > 0:
            step = probe_step(shape[0])
            row = (end - begin) // shape[0]
            data = b"".join(bytes(data[r * row:(r + 1) * row]) for r in range(0, shape[0], step))
            shape = [len(range(0, shape[0], step)), shape[1]]
        buf = bytearray(data)
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape).clone()
    return out


def probe_report(name: str, local: torch.Tensor, row_start: int = 0,
                 rows_total: int | None = None) -> dict[str, Any]:
    """What an engine reports for probe `name`: `local` is the tensor it holds (for a 2-D
    tensor sharded by rows, its shard: global rows [row_start, row_start + len(local)) of
    `rows_total`, padding rows excluded by the caller). Digest over the probe's global rows
    in the shard, in the engine's dtype."""
    rep: dict[str, Any] = {"name": name, "dtype": str(local.dtype).removeprefix("torch."),
                           "rows": None}
    if local.dim() == 2:
        total = rows_total if rows_total is not None else row_start + local.shape[0]
        step = probe_step(total)
        first = -(-row_start // step) * step  # first selected global row in the shard
        stop = row_start + local.shape[0]
        local = local[first - row_start::step]
        rep["rows"] = [first, stop, step]
    rep["digest"] = tensor_digest(local)
    return rep


def verify_probes(expected: Mapping[str, torch.Tensor], reports: Iterable[Mapping[str, Any]],
                  version: int, where: str = "the engine") -> int:
    """Compare an engine's `probe_report`s with the probes of the weights sent (`expected`,
    from `select_probes` / `blob_probes`); returns how many matched. Raises `WeightSyncError`
    on any mismatch, or when nothing could be compared."""
    import torch

    checked = 0
    for rep in reports:
        name = rep["name"]
        exp = expected.get(name)
        if exp is None:  # e.g. a tied lm_head: not sent separately
            continue
        where_rank = f"{where} (worker rank {rep['rank']})" if "rank" in rep else where
        if rep["rows"] is not None:
            first, stop, step = rep["rows"]
            if exp.dim() != 2:
                raise WeightSyncError(f"version {version}: {name} is 2-D in {where_rank} but "
                                      f"{tuple(exp.shape)} in the weights sent")
            # the sent probe holds global rows 0, s, 2s, ... (s = probe_step of all rows)
            if first % step:
                raise WeightSyncError(f"version {version}: {where_rank} reports rows of "
                                      f"{name} off the probe grid ({first}, step {step})")
            exp = exp[first // step:max(first // step, (stop - 1) // step + 1)]
        dtype = getattr(torch, rep["dtype"])
        want = tensor_digest(exp.to(dtype))
        if want != rep["digest"]:
            raise WeightSyncError(
                f"weights of version {version} were not loaded: {where_rank} holds {name}"
                f"{'' if rep['rows'] is None else ' rows %s:%s:%s' % tuple(rep['rows'])} with "
                f"fingerprint {rep['digest'][:16]}, the weights sent have {want[:16]}")
        checked += 1
    if not checked and expected:
        raise WeightSyncError(
            f"weights of version {version} could not be verified: {where} reports none of "
            f"the probe tensors {sorted(expected)}")
    return checked
