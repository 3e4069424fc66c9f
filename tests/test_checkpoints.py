"""Checkpoints as bad input (nebula/checkpoints.py): manifests of checksums, a truncated or
incomplete checkpoint skipped for the previous intact one (with a warning), and a checkpoint
of another job or an incompatible config refused with the mismatching fields named. The
engine tests save and restore through the real DSLearnerEngine on the tiny toy model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from nebula.checkpoints import (MANIFEST, CheckpointError, CheckpointMismatch, check_compatible,
                                job_fingerprint, newest_valid, prune, read_manifest,
                                resolve_resume, verify, write_manifest)


def _fake_checkpoint(path: Path, seed: int, created: float | None = None,
                     manifest: bool = True, global_step: int = 0) -> Path:
    """A dir shaped like a learner checkpoint (DeepSpeed's layout), with its manifest."""
    (path / "v00000001").mkdir(parents=True)
    (path / "latest").write_text("v00000001")
    (path / "v00000001" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3000 + seed))
    (path / "v00000001" / "optim_states.pt").write_bytes(bytes([seed % 256]) * 20000)
    if manifest:
        write_manifest(path, {"global_step": global_step, "tag": path.name})
        if created is not None:  # pin the recorded creation time (order tests)
            m = json.loads((path / MANIFEST).read_text())
            m["created"] = created
            (path / MANIFEST).write_text(json.dumps(m))
    return path


def _truncate(path: Path, keep: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


# -- manifest and verify ------------------------------------------------------------------------

def test_manifest_records_every_file_and_is_written_last(tmp_path: Path) -> None:
    ck = _fake_checkpoint(tmp_path / "sft0-step1", 1)
    m = read_manifest(ck)
    assert m["meta"] == {"global_step": 0, "tag": "sft0-step1"}
    assert [f["path"] for f in m["files"]] == [
        "latest", "v00000001/mp_rank_00_model_states.pt", "v00000001/optim_states.pt"]
    assert m["files"][2]["bytes"] == 20000 and len(m["files"][2]["sha256"]) == 64
    assert not (ck / (MANIFEST + ".tmp")).exists()
    assert verify(ck) is None and verify(ck, checksums=False) is None
    write_manifest(ck, {"again": True})  # rewriting never lists the manifest itself
    assert MANIFEST not in [f["path"] for f in read_manifest(ck)["files"]]
    assert verify(ck) is None


def test_verify_names_the_broken_file(tmp_path: Path) -> None:
    ck = _fake_checkpoint(tmp_path / "ck", 1)
    optim = ck / "v00000001" / "optim_states.pt"
    _truncate(optim)
    reason = verify(ck)
    assert reason is not None and "v00000001/optim_states.pt" in reason and "100 bytes" in reason
    assert verify(ck, checksums=False) == reason  # sizes alone catch a truncation

    optim.write_bytes(b"\x07" * 20000)  # same size, other bytes
    reason = verify(ck)
    assert reason is not None and "optim_states.pt" in reason and "sha256" in reason
    assert verify(ck, checksums=False) is None

    optim.unlink()
    assert verify(ck) == "v00000001/optim_states.pt: missing"

    (ck / MANIFEST).write_text('{"files": [')  # a manifest cut short
    assert "unreadable manifest.json" in (verify(ck) or "")
    (ck / MANIFEST).unlink()
    assert "no manifest.json" in (verify(ck) or "")
    assert verify(tmp_path / "nowhere") == "not a directory"


# -- newest_valid / resolve_resume / prune ------------------------------------------------------

def test_newest_valid_skips_corrupt_and_incomplete_with_warnings(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    a = _fake_checkpoint(root / "grpo1-step2", 1, created=1000.0, global_step=2)
    b = _fake_checkpoint(root / "grpo1-step4", 2, created=2000.0, global_step=4)
    _fake_checkpoint(root / "grpo1-step6", 3, manifest=False)  # a save that died
    (root / "export").mkdir()  # the HF export: not a checkpoint
    (root / "sft0-prepared.json").write_text("[]")
    os.utime(a, (4e9, 4e9))  # order is the manifest's, not the dirs' mtimes
    warnings: list[str] = []
    assert newest_valid(root, warnings.append) == b
    assert len(warnings) == 1 and "grpo1-step6" in warnings[0] and "no manifest" in warnings[0]

    _truncate(b / "v00000001" / "mp_rank_00_model_states.pt")
    warnings.clear()
    assert newest_valid(root, warnings.append) == a
    assert [w.split(" skipped")[0] for w in warnings] == [f"checkpoint {root / 'grpo1-step6'}",
                                                         f"checkpoint {b}"]
    assert "mp_rank_00_model_states.pt: 100 bytes" in warnings[1]

    _truncate(a / "latest", 1)
    assert newest_valid(root, warnings.append) is None
    assert newest_valid(tmp_path / "none") is None


def test_resolve_resume_root_dir_and_fallback(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    a = _fake_checkpoint(root / "sft0-step2", 1, created=1000.0)
    b = _fake_checkpoint(root / "sft0-step4", 2, created=2000.0)
    c = _fake_checkpoint(root / "sft0-end", 3, created=3000.0)
    warnings: list[str] = []
    assert resolve_resume(root, warnings.append) == c  # the root: its newest intact one
    assert resolve_resume(b, warnings.append) == b  # a named intact dir: that one
    assert resolve_resume(b / "v00000001", warnings.append) == b  # DeepSpeed's tag dir in it
    assert resolve_resume(str(a), warnings.append) == a
    assert warnings == []

    (b / "v00000001" / "optim_states.pt").write_bytes(b"x")  # corrupt the named one
    assert resolve_resume(b, warnings.append) == a  # the one before it, not the newer c
    assert any(f"checkpoint {b} is unusable" in w and "optim_states.pt" in w
               and f"previous intact checkpoint {a}" in w for w in warnings), warnings

    _truncate(a / "latest", 1)
    with pytest.raises(CheckpointError, match="no intact checkpoint before it"):
        resolve_resume(b, warnings.append)
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_resume(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        resolve_resume(tmp_path / "empty")


def test_prune_keeps_the_newest_complete(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    old = _fake_checkpoint(root / "s-1", 1, created=1000.0)
    mid = _fake_checkpoint(root / "s-2", 2, created=2000.0)
    new = _fake_checkpoint(root / "s-3", 3, created=3000.0)
    dead = _fake_checkpoint(root / "s-4", 4, manifest=False)
    (root / "export").mkdir()
    logged: list[str] = []
    assert sorted(prune(root, 2, logged.append)) == sorted([old, dead])
    assert sorted(p.name for p in root.iterdir()) == ["export", "s-2", "s-3"]
    assert len(logged) == 1 and "s-4" in logged[0]
    assert mid.is_dir() and new.is_dir()


# -- job identity -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen2 (hidden 64, 2 layers, char vocab) with its tokenizer."""
    pytest.importorskip("transformers")
    from nebula.toy_model import build_toy_model
    from test_ds_engine import TINY

    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_toy_model(path, TINY)
    return str(path)


def _job(model_dir: str, data: Path, **over: Any) -> Any:
    from nebula.config.job import JobConfig

    cfg: dict[str, Any] = {
        "name": "rev", "output_dir": str(data.parent / "out"),
        "model": {"path": model_dir},
        "datasets": {"train": [{"path": str(data), "verifier": "exact"}]},
        "stages": [{"type": "sft", "steps": 10, "batch_size": 8},
                   {"type": "grpo", "steps": 20}],
        "learner": {"zero_stage": 2, "lr": 1e-4, "groups_per_step": 4},
    }
    for key, value in over.items():  # "learner.lr" -> cfg["learner"]["lr"]
        *path, last = key.split(".")
        node = cfg
        for k in path:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[last] = value
    return JobConfig.model_validate(cfg)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    p = tmp_path / "data" / "train.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "a"}) + "\n" for i in range(9)))
    return p


def _meta(cfg: Any, stage_index: int = 1, stage_step: int = 4, done: bool = False
          ) -> dict[str, Any]:
    return {"job": job_fingerprint(cfg), "stage_index": stage_index, "stage_step": stage_step,
            "stage_done": done, "global_step": 14, "version": 14, "tag": "grpo1-step4"}


def test_compatible_changes_pass(model_dir: str, data: Path, tmp_path: Path) -> None:
    meta = _meta(_job(model_dir, data))
    moved = tmp_path / "elsewhere" / "train.jsonl"  # the same data, moved
    moved.parent.mkdir()
    shutil.copy(data, moved)
    for over in [{}, {"stages.1.steps": 200, "stages.0.steps": 50, "learner.lr": 3e-5,
                      "learner.lr_schedule": "cosine", "learner.clip_high": 0.3,
                      "output_dir": str(tmp_path / "new-out"),
                      "checkpoint": {"interval": 7, "keep": 5},
                      "eval": {"interval": 3, "max_prompts": 10},
                      "rollout": {"temperature": 0.7, "workers": 2},
                      "async": {"max_staleness": 0}, "learner.micro_batch": 8},
                 {"datasets.train.0.path": str(moved)}]:
        check_compatible(meta, _job(model_dir, data, **over), path="ck/grpo1-step4")
    check_compatible({"meta": meta, "files": []}, _job(model_dir, data))  # a whole manifest


def test_another_job_or_config_is_refused_naming_each_field(model_dir: str, data: Path,
                                                            tmp_path: Path) -> None:
    from nebula.config.job import ToyModelConfig
    from nebula.toy_model import build_toy_model

    meta = _meta(_job(model_dir, data))
    wider = tmp_path / "wider"
    build_toy_model(wider, ToyModelConfig(hidden_size=128, layers=2, heads=2,
                                          intermediate_size=128, max_position=64))
    other = _job(str(wider), data, name="other", **{"learner.zero_stage": 3,
                                                    "model.dtype": "bfloat16"})
    with pytest.raises(CheckpointMismatch) as ei:
        check_compatible(meta, other, path="runs/x/ckpt/grpo1-step4")
    msg = str(ei.value)
    assert msg.startswith("checkpoint runs/x/ckpt/grpo1-step4 is from another job or config: ")
    assert "name: 'rev' (checkpoint) != 'other' (this job)" in msg
    assert "model.config.hidden_size: 64 (checkpoint) != 128 (this job)" in msg
    assert "model.dtype: 'float32' (checkpoint) != 'bfloat16' (this job)" in msg
    assert "learner.zero_stage: 2 (checkpoint) != 3 (this job)" in msg

    swapped = _job(model_dir, data, stages=[{"type": "grpo", "steps": 20},
                                            {"type": "sft", "steps": 10}])
    with pytest.raises(CheckpointMismatch,
                       match=r"stages: \['sft', 'grpo'\] \(checkpoint\) != \['grpo', 'sft'\]"):
        check_compatible(meta, swapped)
    check_compatible(meta, _job(model_dir, data, stages=[  # a stage added after it
        {"type": "sft", "steps": 10, "batch_size": 8}, {"type": "grpo", "steps": 20},
        {"type": "grpo", "steps": 5}]))
    with pytest.raises(CheckpointMismatch, match="no job fingerprint"):
        check_compatible({"stage_index": 0}, swapped)


def test_data_order_must_match_only_mid_stage(model_dir: str, data: Path) -> None:
    base = _job(model_dir, data)
    reseeded = _job(model_dir, data, seed=5, **{"learner.groups_per_step": 8})
    with pytest.raises(CheckpointMismatch) as ei:  # mid-grpo: the rest of the stage differs
        check_compatible(_meta(base, stage_index=1), reseeded)
    msg = str(ei.value)
    assert "step 4 of stage 1" in msg
    assert "seed: 0 (checkpoint) != 5 (this job)" in msg
    assert "learner.groups_per_step: 4 (checkpoint) != 8 (this job)" in msg
    # At a stage's end, the next stage starts afresh: data order may change.
    check_compatible(_meta(base, stage_index=1, done=True), reseeded)
    # Mid-sft: groups_per_step is an RL setting; its batch_size and data are not.
    check_compatible(_meta(base, stage_index=0), _job(model_dir, data, **{
        "learner.groups_per_step": 8, "stages.1.steps": 5}))
    with pytest.raises(CheckpointMismatch, match=r"stages\.0\.batch_size: 8 \(checkpoint\) "
                                                 r"!= 16 \(this job\)"):
        check_compatible(_meta(base, stage_index=0), _job(model_dir, data,
                                                          **{"stages.0.batch_size": 16}))
    mid_sft = _meta(base, stage_index=0)
    data.write_text(data.read_text() + json.dumps({"prompt": "new", "answer": "b"}) + "\n")
    with pytest.raises(CheckpointMismatch, match=r"datasets\.train: \[\{'file': 'train.jsonl', "
                                                 r"'bytes': \d+, 'limit': None\}\] \(checkp"):
        check_compatible(mid_sft, _job(model_dir, data))


# -- with the real DeepSpeed engine ----------------------------------------------------------

def test_truncated_newest_checkpoint_restores_the_previous(model_dir: str, data: Path,
                                                           tmp_path: Path) -> None:
    """Two checkpoints with manifests; the newest's optimizer file cut short: verify names
    it, the previous one is chosen with a warning, and an engine restored from it has its
    weights. The broken one fails in load_checkpoint with an error naming the dir."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    import test_ds_engine as ds

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = _job(model_dir, data)
    fp = job_fingerprint(cfg)
    root = tmp_path / "checkpoints"
    a = b = None
    try:
        a = ds._engine(model_dir, micro_batch=2)
        saved = {}
        for step in (1, 2):
            a.sft_step(ds.SFT_PAIRS)
            tag = f"sft0-step{step}"
            meta = {"job": fp, "stage_index": 0, "stage_step": step, "stage_done": False,
                    "global_step": step, "version": a.version, "tag": tag}
            a.save_checkpoint(root / tag, {"stage_step": step}, manifest=meta)
            saved[tag] = ds._weights(a)
        a.sft_step(ds.SFT_PAIRS)
        a.save_checkpoint(root / "sft0-step3", {"stage_step": 3})  # no manifest: incomplete
        assert verify(root / "sft0-step2") is None
        assert read_manifest(root / "sft0-step2")["meta"]["version"] == 2

        optim = next((root / "sft0-step2").rglob("*optim_states.pt"))
        _truncate(optim, optim.stat().st_size // 2)
        reason = verify(root / "sft0-step2")
        assert reason is not None and "v00000002/" in reason and optim.name in reason

        warnings: list[str] = []
        chosen = resolve_resume(root, warnings.append, cfg=cfg)
        assert chosen == root / "sft0-step1"
        assert len(warnings) == 2 and "sft0-step3" in warnings[0] and "no manifest" in warnings[0]
        assert "sft0-step2" in warnings[1] and optim.name in warnings[1]
        warnings.clear()
        assert resolve_resume(root / "sft0-step2", warnings.append) == chosen
        assert "previous intact checkpoint" in warnings[-1]

        b = ds._engine(model_dir, micro_batch=2)
        with pytest.raises(CheckpointError, match="sft0-step2 is unusable: .*optim_states"):
            b.load_checkpoint(root / "sft0-step2")
        assert b.load_checkpoint(chosen) == {"stage_step": 1}
        assert b.version == 1
        ds._assert_same(ds._weights(b), saved["sft0-step1"])
        assert not all(torch.equal(v, saved["sft0-step2"][k])
                       for k, v in ds._weights(b).items())

        # Without a manifest to check against, a corrupt file still fails naming the dir.
        bare = tmp_path / "bare"
        shutil.copytree(root / "sft0-step2", bare)
        (bare / MANIFEST).unlink()
        with pytest.raises(CheckpointError, match=f"checkpoint {bare} could not be loaded"):
            b.load_checkpoint(bare)
    finally:
        torch.set_num_threads(n)
        for e in (a, b):
            if e is not None:
                e.close()
