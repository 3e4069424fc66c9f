"""Learner checkpoints as bad input: integrity (a manifest of checksums) and job identity.

A checkpoint dir (`checkpoint.dir/<tag>`, written by the learner through DeepSpeed) is
complete only once `manifest.json` is in it: `write_manifest` records every file of the dir
(relative path, size, sha256) and the checkpoint's meta (the job's fingerprint, stage, step,
policy version) and is written last, atomically. So

- a dir without a manifest is an incomplete checkpoint (a save that died half-way, or one
  written before manifests existed): never resumed from;
- `verify` re-reads the files and names the first one missing, truncated or changed;
- `newest_valid` / `resolve_resume` skip such dirs with a warning that names the dir and
  the reason, and resume from the previous intact checkpoint instead of crashing inside
  DeepSpeed.

Job identity: `job_fingerprint(cfg)` is what a checkpoint must share with the job that
resumes from it, and `check_compatible` refuses a checkpoint of another job or an
incompatible config, naming every mismatching field with both values. Always compared:

- `name` (a checkpoint of another job);
- the model's architecture (config.json: model type, vocab size, widths, layers, heads,
  tied embeddings) and tokenizer (a hash of its vocabulary files), and `model.dtype`
  (the DeepSpeed state holds weights and fp32 master copies of that dtype);
- `learner.zero_stage` (the optimizer state's layout on disk);
- `stages`: their types, in order, up to the checkpoint's stage (a checkpoint says "stage
  i, step s"); stages after it may be added, removed or changed.

Compared only when the checkpoint is in the middle of a stage (not at its end), since they
decide which examples the rest of that stage sees (its data order is replayed up to the
checkpoint's step): `seed`, `datasets.train` (each file's name and size, and `limit`), the
resumed stage's own `dataset` and `batch_size` where its type has them, and
`learner.groups_per_step` for an online (RL) stage (ticket t is trained at step t // G).

Everything else may change on resume: stage `steps` (extend or shorten training), learning
rates and schedules, loss settings (clip, KL, normalisation), rollout settings, eval,
`output_dir`, `checkpoint.*` (interval, keep, dir), recovery, cluster addresses. The model
and data may move: paths are not compared, only what is in them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from nebula.config.job import JobConfig

__all__ = ["MANIFEST", "CheckpointError", "CheckpointMismatch", "check_compatible",
           "checkpoint_dirs", "job_fingerprint", "newest_valid", "prune", "read_manifest",
           "resolve_resume", "verify", "write_manifest"]

MANIFEST = "manifest.json"
FORMAT = "nebula-checkpoint/1"
_CHUNK = 8 << 20  # bytes read per hash update
_SKIP = {"export"}  # not learner checkpoints: the Hugging Face export
_DS_TAG = re.compile(r"^v\d+$")  # DeepSpeed's tag subdir (ds_weights: v<version:08d>)

_log = logging.getLogger("nebula.checkpoints")
Log = Callable[[str], Any]


class CheckpointError(ValueError):
    """No usable checkpoint where one was named (bad input, refused before DeepSpeed)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint of another job or of an incompatible config."""


# -- manifest ---------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(ckpt_dir: Path) -> list[Path]:
    """Every regular file under the dir but the manifest (and its temp file), sorted."""
    return sorted(p for p in ckpt_dir.rglob("*")
                  if p.is_file() and not p.is_symlink()
                  and p.relative_to(ckpt_dir).as_posix() not in (MANIFEST, MANIFEST + ".tmp"))


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of each file; a few files at once (hashlib releases the GIL on big buffers)."""
    if len(paths) <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(ckpt_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Record every file under the fully written checkpoint dir (relative path, size, sha256)
    and `meta` (JSON: the job fingerprint, stage, step, version) in `ckpt_dir/manifest.json`,
    written atomically and last: a dir without one is an incomplete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    paths = _files(ckpt_dir)
    sizes = [p.stat().st_size for p in paths]
    digests = _hash_all(paths)
    manifest = {
        "format": FORMAT, "created": time.time(), "meta": meta,
        "files": [{"path": p.relative_to(ckpt_dir).as_posix(), "bytes": n, "sha256": d}
                  for p, n, d in zip(paths, sizes, digests)],
    }
    out = ckpt_dir / MANIFEST
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    try:  # the rename itself survives a power cut
        fd = os.open(ckpt_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - file systems without dir fsync
        pass
    return out


def _load_manifest(ckpt_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(the manifest, "") or (None, why there is no usable one)."""
    try:
        data = json.loads((ckpt_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return None, (f"no {MANIFEST} (an incomplete checkpoint, or one written before "
                      "manifests existed)")
    except (OSError, ValueError) as e:
        return None, f"unreadable {MANIFEST} ({e})"
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) \
            or not isinstance(data.get("meta"), dict):
        return None, f"{MANIFEST} is not a checkpoint manifest"
    return data, ""


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The dir's manifest; CheckpointError when it has none or it is unreadable."""
    data, reason = _load_manifest(Path(ckpt_dir))
    if data is None:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {reason}")
    return data


def verify(ckpt_dir: str | os.PathLike, checksums: bool = True) -> str | None:
    """None if the checkpoint dir is intact, else why not: no or unreadable manifest, a file
    missing, of another size (truncated) or, with `checksums`, another sha256 (each names
    the file). `checksums=False` checks presence and sizes only (no file is read)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return "not a directory"
    manifest, reason = _load_manifest(ckpt_dir)
    if manifest is None:
        return reason
    todo = []
    for entry in manifest["files"]:
        try:
            rel, size, digest = str(entry["path"]), int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST}: malformed file entry {entry!r}"
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{MANIFEST}: file entry {rel!r} is outside the checkpoint dir"
        path = ckpt_dir / rel
        if not path.is_file():
            return f"{rel}: missing"
        got = path.stat().st_size
        if got != size:
            return f"{rel}: {got} bytes, the manifest says {size} (truncated or rewritten)"
        todo.append((rel, path, digest))
    if checksums:
        for (rel, _, digest), got in zip(todo, _hash_all([p for _, p, _ in todo])):
            if got != digest:
                return f"{rel}: sha256 {got[:12]}… differs from the manifest's {digest[:12]}…"
    return None


# -- finding a checkpoint ------------------------------------------------------------------------

def _order_key(ckpt_dir: Path) -> tuple[float, int]:
    """Newer checkpoints sort higher: the manifest's creation time (then global step); a dir
    without a readable manifest by its mtime."""
    try:
        m = read_manifest(ckpt_dir)
        return float(m.get("created", 0.0)), int(m["meta"].get("global_step", 0) or 0)
    except (CheckpointError, TypeError, ValueError):
        try:
            return ckpt_dir.stat().st_mtime, -1
        except OSError:
            return 0.0, -1


def checkpoint_dirs(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Candidate checkpoint dirs under the root (not `export`, not hidden), newest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir()
            if p.is_dir() and p.name not in _SKIP and not p.name.startswith(".")]
    return sorted(dirs, key=_order_key, reverse=True)


def newest_valid(checkpoint_root: str | os.PathLike, log: Log | None = None, *,
                 older_than: str | os.PathLike | None = None) -> Path | None:
    """The newest intact checkpoint dir under the root (only those older than `older_than`,
    a checkpoint dir of the root, when given), or None. Each one skipped is logged as a
    warning naming the dir and why."""
    warn = log or _log.warning
    dirs = checkpoint_dirs(checkpoint_root)
    if older_than is not None:
        bound = Path(older_than)
        key = _order_key(bound)
        dirs = [d for d in dirs if d.resolve() != bound.resolve() and _order_key(d) < key]
    for d in dirs:
        reason = verify(d)
        if reason is None:
            return d
        warn(f"checkpoint {d} skipped: {reason}")
    return None


def _is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint dir (intact or not) rather than a root of them."""
    if (path / MANIFEST).exists() or (path / "latest").exists():
        return True
    children = [p for p in path.iterdir() if p.is_dir()]
    if any((c / MANIFEST).exists() or (c / "latest").exists() for c in children):
        return False
    return any(_DS_TAG.match(c.name) for c in children)


def resolve_resume(path: str | os.PathLike, log: Log | None = None,
                   cfg: JobConfig | None = None) -> Path:
    """The checkpoint dir to resume from. `path` (the job's `resume_from`) names one
    checkpoint dir or the checkpoint root (then: its newest intact checkpoint). A named
    checkpoint that is incomplete or corrupted falls back, with a warning, to the newest
    intact one before it in the same root. With `cfg`, the chosen checkpoint must also be
    compatible with that job (`check_compatible`). CheckpointError when nothing usable is
    there; nothing here touches DeepSpeed."""
    warn = log or _log.warning
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"resume_from: {path} is not a directory")
    if not (p / MANIFEST).exists() and _DS_TAG.match(p.name) and (
            (p.parent / MANIFEST).exists() or (p.parent / "latest").exists()):
        p = p.parent  # named DeepSpeed's tag subdir inside a checkpoint
    if _is_checkpoint_dir(p):
        reason = verify(p)
        if reason is None:
            chosen: Path | None = p
        else:
            chosen = newest_valid(p.parent, warn, older_than=p)
            if chosen is None:
                raise CheckpointError(f"resume_from: checkpoint {p} is unusable ({reason}) "
                                      f"and no intact checkpoint before it is in {p.parent}")
            warn(f"checkpoint {p} is unusable ({reason}); resuming from the previous intact "
                 f"checkpoint {chosen}")
    else:
        chosen = newest_valid(p, warn)
        if chosen is None:
            raise CheckpointError(f"resume_from: no intact checkpoint in {p}")
    assert chosen is not None
    if cfg is not None:
        check_compatible(read_manifest(chosen)["meta"], cfg, path=chosen)
    return chosen


def prune(checkpoint_root: str | os.PathLike, keep: int, log: Log | None = None) -> list[Path]:
    """Keep the `keep` newest complete checkpoints (with a manifest; their files are not
    re-hashed) and remove every older dir and every incomplete one (no manifest: a save
    that died). `export` and files are left alone. Returns what was removed."""
    import shutil

    removed = []
    complete = 0
    for d in checkpoint_dirs(checkpoint_root):
        done = (d / MANIFEST).is_file()
        if done and complete < keep:
            complete += 1
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        if log is not None and not done:
            log(f"removed incomplete checkpoint {d} (no {MANIFEST})")
    return removed


# -- job identity ----------------------------------------------------------------------------

# config.json fields that fix the weights' shapes and meaning.
_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
              "tie_word_embeddings")
# Files that hold a tokenizer's vocabulary (not its chat template, which may change).
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


def _file_identity(path: str | None, limit: int | None = None) -> dict[str, Any] | None:
    """A data file as the fingerprint sees it: name and size (and `limit`), not its path,
    so a moved file still matches; a dir counts its files' total size."""
    if not path:
        return None
    p = Path(path)
    try:
        if p.is_file():
            size: int | None = p.stat().st_size
        elif p.is_dir():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            size = None
    except OSError:
        size = None
    return {"file": p.name, "bytes": size, "limit": limit}


def _model_identity(model_path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    p = Path(model_path)
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict):
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        for k in _ARCH_KEYS:
            v = config.get(k, text.get(k))
            if v is not None:
                out[f"model.config.{k}"] = v
    else:  # no readable config.json: the path is all there is to compare
        out["model.path"] = model_path
    h = hashlib.sha256()
    found = False
    for name in _VOCAB_FILES:
        f = p / name
        if f.is_file():
            h.update(name.encode() + b"\0" + _sha256(f).encode())
            found = True
    if found:
        out["model.tokenizer"] = h.hexdigest()[:16]
    return out


def job_fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """What a checkpoint must share with the job resuming from it (see the module doc), as
    flat {field: value} (JSON). Reads the model's config.json, hashes its tokenizer
    vocabulary files (a few MB) and stats the data files: compute it once per job."""
    fp: dict[str, Any] = {"name": cfg.name}
    fp.update(_model_identity(cfg.model.path))
    fp["model.dtype"] = cfg.model.dtype
    fp["learner.zero_stage"] = cfg.learner.zero_stage
    fp["stages"] = [st.type for st in cfg.stages]
    # Data order (compared for a checkpoint in the middle of a stage only).
    fp["seed"] = cfg.seed
    fp["learner.groups_per_step"] = cfg.learner.groups_per_step
    fp["datasets.train"] = [_file_identity(d.path, d.limit) for d in cfg.datasets.train]
    for i, st in enumerate(cfg.stages):
        data = getattr(st, "dataset", None)
        if data is not None:
            fp[f"stages.{i}.dataset"] = _file_identity(getattr(data, "path", None),
                                                       getattr(data, "limit", None))
        if isinstance(getattr(st, "batch_size", None), int):
            fp[f"stages.{i}.batch_size"] = st.batch_size
    return json.loads(json.dumps(fp))  # as it reads back from a manifest


def _identity_field(key: str) -> bool:
    """A fingerprint field compared for every checkpoint (not only mid-stage)."""
    return key in ("name", "learner.zero_stage", "stages") or key.startswith("model.")


def _compared(key: str, stage_index: int | None, online: bool) -> bool:
    """Whether a fingerprint field must match, for a checkpoint in the middle of stage
    `stage_index` (None: at a stage's end)."""
    if _identity_field(key):
        return True
    if stage_index is None:
        return False
    if key in ("seed", "datasets.train"):
        return True
    if key == "learner.groups_per_step":
        return online
    m = re.match(r"^stages\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) == stage_index


def check_compatible(manifest_meta: dict[str, Any], cfg: JobConfig,
                     path: str | os.PathLike | None = None) -> None:
    """Refuse (CheckpointMismatch, naming every mismatching field with both values) a
    checkpoint whose meta (`read_manifest(dir)["meta"]`) is from another job or a config
    this job cannot resume from."""
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    if "meta" in manifest_meta and "files" in manifest_meta:  # a whole manifest
        manifest_meta = manifest_meta["meta"]
    theirs = manifest_meta.get("job")
    if not isinstance(theirs, dict):
        raise CheckpointMismatch(f"{where} records no job fingerprint: not written by a "
                                 "nebula learner with manifests")
    ours = job_fingerprint(cfg)
    mid = not manifest_meta.get("stage_done", False)
    idx = manifest_meta.get("stage_index")
    stage_index = int(idx) if mid and isinstance(idx, int) else None
    online = False
    if stage_index is not None and 0 <= stage_index < len(cfg.stages):
        from nebula.algo import algorithm

        online = bool(algorithm(cfg.stages[stage_index], cfg).online)
    absent = object()
    diffs = []
    for key in sorted(set(ours) | set(theirs), key=lambda k: (not k.startswith("name"), k)):
        if not _compared(key, stage_index, online):
            continue
        a, b = theirs.get(key, absent), ours.get(key, absent)
        if key not in theirs and not key.startswith("model."):
            continue  # a field newer than the checkpoint's fingerprint
        if key == "stages" and isinstance(a, list) and isinstance(b, list) \
                and isinstance(idx, int):  # stages after the checkpoint's may change
            same = a[:idx + 1] == b[:idx + 1]
        else:
            same = a == b
        if not same:
            fa = "(absent)" if a is absent else repr(a)
            fb = "(absent)" if b is absent else repr(b)
            diffs.append(f"{key}: {fa} (checkpoint) != {fb} (this job)")
    if diffs:
        at = ""
        if any(not _identity_field(d.split(": ", 1)[0]) for d in diffs):
            at = (f" (it is at step {manifest_meta.get('stage_step')} of stage {stage_index}: "
                  "the rest of that stage needs the same data order)")
        raise CheckpointMismatch(f"{where} is from another job or config{at}: "
                                 + "; ".join(diffs))
