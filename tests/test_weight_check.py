"""Weight-sync verification (nebula/weight_check.py, rollout/weight_loader.py): blob
fingerprints, probe tensors compared after a load (also across tensor-parallel shards and
dtypes), a corrupted blob refused, a load the engine does not really hold refused, fetches
that never resolve timing out, and the NCCL update's rollout side (lock, watchdog, verified
finish) with a fake transfer. The hf engine on the toy model stands in for vLLM."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

torch = pytest.importorskip("torch")

from nebula.config.job import ToyModelConfig  # noqa: E402
from nebula.toy_model import build_toy_model  # noqa: E402
from nebula.weight_check import (  # noqa: E402
    PROBE_ROWS,
    TIMEOUT_ENV,
    WeightSyncError,
    WeightSyncTimeout,
    blob_fingerprint,
    blob_probes,
    check_blob,
    probe_report,
    probe_step,
    select_probes,
    sync_timeout_s,
    verify_probes,
)
from rollout.engine import blob_to_state_dict, state_dict_to_blob  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy") / "m", ToyModelConfig(seed=0))


@pytest.fixture(scope="module")
def toy_state(toy: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy, dtype=torch.float32).state_dict()


def perturbed(state: dict[str, Any], seed: int) -> dict[str, Any]:
    """Other weights of the same model; tied tensors (lm_head = embedding) stay tied."""
    g = torch.Generator().manual_seed(seed)
    out, by_ptr = {}, {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr not in by_ptr:
            by_ptr[ptr] = v + 0.01 * torch.randn(v.shape, generator=g) \
                if v.is_floating_point() else v
        out[k] = by_ptr[ptr]
    return out


# --------------------------------------------------------------------------- fingerprints


def test_blob_fingerprint_detects_any_change() -> None:
    blob = bytes(range(256)) * 4096
    fp = blob_fingerprint(blob)
    assert fp == blob_fingerprint(bytearray(blob)) == blob_fingerprint(memoryview(blob))
    assert fp.split(":")[0] in ("xxh3_128", "sha256")
    flipped = bytearray(blob)
    flipped[12345] ^= 1
    assert blob_fingerprint(bytes(flipped)) != fp
    check_blob(blob, fp, 3)
    check_blob(blob, None, 3)  # nothing published with it: unchecked
    with pytest.raises(WeightSyncError) as e:
        check_blob(bytes(flipped), fp, 7)
    msg = str(e.value)
    assert "version 7" in msg and fp in msg and blob_fingerprint(bytes(flipped)) in msg
    # the algorithm travels with the fingerprint: sha256 ones are checked with sha256
    sha = blob_fingerprint(blob, "sha256")
    assert sha.startswith("sha256:")
    check_blob(blob, sha, 1)
    with pytest.raises(WeightSyncError):
        check_blob(bytes(flipped), sha, 1)


def test_sync_timeout_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert sync_timeout_s() == 300.0
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert sync_timeout_s() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            sync_timeout_s()


# --------------------------------------------------------------------------------- probes


def test_blob_probes_read_only_the_probe_rows(toy_state: dict[str, Any]) -> None:
    big = {"model.embed_tokens.weight": torch.randn(1000, 8),
           "lm_head.weight": torch.randn(1000, 8),
           "model.norm.weight": torch.randn(8),
           "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16)}
    for dtype in (torch.float32, torch.bfloat16):
        blob = state_dict_to_blob(big, dtype=dtype)
        probes = blob_probes(blob)
        want = select_probes(blob_to_state_dict(blob))
        assert sorted(probes) == sorted(want) == sorted(
            ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"])
        step = probe_step(1000)
        assert probes["lm_head.weight"].shape == (len(range(0, 1000, step)), 8)
        assert probes["lm_head.weight"].shape[0] <= PROBE_ROWS
        for k in probes:
            assert probes[k].dtype == dtype and torch.equal(probes[k], want[k])
    probes = blob_probes(state_dict_to_blob(toy_state))  # tied: no lm_head in the blob
    assert sorted(probes) == ["model.embed_tokens.weight", "model.norm.weight"]
    with pytest.raises(WeightSyncError, match="not safetensors"):
        blob_probes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")


def test_verify_probes_across_shards_and_dtypes() -> None:
    emb = torch.randn(1000, 8)
    norm = torch.randn(8)
    sent = select_probes({"model.embed_tokens.weight": emb, "model.norm.weight": norm})

    def shard_reports(weight: torch.Tensor, dtype: torch.dtype, tp: int) -> list[dict]:
        """As a TP engine reports: each rank a padded vocabulary shard (padding left out)."""
        per = -(-1000 // tp)
        reports = []
        for rank in range(tp):
            lo, hi = rank * per, min(1000, (rank + 1) * per)
            padded = torch.zeros(per + 7, 8, dtype=dtype)
            padded[:hi - lo] = weight[lo:hi].to(dtype)
            reports.append(dict(probe_report("model.embed_tokens.weight", padded[:hi - lo],
                                             row_start=lo, rows_total=1000), rank=rank))
            reports.append(dict(probe_report("model.norm.weight", norm.to(dtype)), rank=rank))
        return reports

    for tp in (1, 2, 3):
        for dtype in (torch.float32, torch.bfloat16):
            assert verify_probes(sent, shard_reports(emb, dtype, tp), 4) == 2 * tp
    stale = emb.clone()
    stale[probe_step(1000) * 100] += 1.0  # a compared row of rank 1 of 3 differs
    with pytest.raises(WeightSyncError) as e:
        verify_probes(sent, shard_reports(stale, torch.float32, 3), 4)
    assert "version 4" in str(e.value) and "rank 1" in str(e.value)
    with pytest.raises(WeightSyncError, match="none of the probe tensors"):
        verify_probes(sent, [probe_report("model.layers.0.x", torch.ones(3))], 4)


# ------------------------------------------------------------------ loads into an engine


class NoOpLoadEngine:
    """An engine whose load 'succeeds' but leaves the weights as they were: the silent
    failure the post-load check exists for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, blob: bytes, version: int) -> None:
        self._version = int(version)

    def weights_report(self) -> list[dict]:
        return self.inner.weights_report()


def test_loader_verifies_the_engine_holds_the_weights(toy: Path, toy_state: dict) -> None:
    from rollout.hf_engine import HFEngine
    from rollout.weight_loader import WeightLoader

    engine = HFEngine(toy, dtype="float32", seed=0)
    loader = WeightLoader(store=None, engine=engine, timeout_s=5)
    new = state_dict_to_blob(perturbed(toy_state, 1))
    loader.load(new, 1, blob_fingerprint(new))
    assert engine.version == 1 and loader.error is None
    loader.check_usable()

    # bf16 engine, fp32 blob: compared in the engine's dtype
    bf = HFEngine(toy, dtype="bfloat16", seed=0)
    WeightLoader(None, bf, timeout_s=5).load(new, 2, blob_fingerprint(new))
    assert bf.version == 2

    # a load that silently does nothing is caught, and the engine is not used afterwards
    fake = NoOpLoadEngine(HFEngine(toy, dtype="float32", seed=0))
    loader = WeightLoader(None, fake, timeout_s=5, name="rollout-7")
    with pytest.raises(WeightSyncError) as e:
        loader.load(new, 3, blob_fingerprint(new))
    assert "version 3 were not loaded" in str(e.value) and "rollout-7" in str(e.value)
    with pytest.raises(WeightSyncError, match="not generating"):
        loader.check_usable()


# ------------------------------------------------------------- through Ray (store, worker)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="nray-", dir="/tmp"), logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def gate_classes() -> tuple[type, type]:
    """Ray actor classes defined here, so Ray ships them by value (the workers cannot import
    a test module): `Gate.wait` returns only once `open` is called - an ObjectRef that
    deterministically never resolves while the test holds the gate shut; `BlockedStore` is a
    weight store whose `latest` hangs until opened."""

    class Gate:
        def __init__(self) -> None:
            self.event = threading.Event()

        def wait(self, value: Any = None) -> Any:
            self.event.wait()
            return value

        def open(self) -> None:
            self.event.set()

    class BlockedStore(Gate):
        def latest(self) -> tuple:
            self.event.wait()
            return -1, [], -1, None

    return Gate, BlockedStore


def bare_worker(engine: Any, store: Any, timeout_s: float = 30) -> Any:
    """A RolloutWorker with only what weight syncs use (no Redis, verifier, prompts)."""
    from rollout.weight_loader import WeightLoader
    from rollout.worker import RolloutWorker

    w = object.__new__(RolloutWorker)
    w.name, w.engine, w.store, w.loaded_steps = "rollout-0", engine, store, -1
    w.weights = WeightLoader(store, engine, timeout_s=timeout_s, name=w.name)
    w.stats = {"weight_loads": 0, "weight_fetch_s": 0.0, "weight_load_s": 0.0}
    w._engine_lock = threading.Lock()
    w._update_mutex = threading.Lock()
    w._update, w._update_timer = None, None
    return w


def greedy(engine: Any, ids: list[list[int]]) -> list[list[int]]:
    return [g[0].completion_ids for g in engine.generate(ids, 1, 0.0, 1.0, 8)]


def test_worker_sync_refuses_corrupted_blob(ray_session: None, toy: Path,
                                            toy_state: dict) -> None:
    import ray

    from rollout.hf_engine import HFEngine
    from rollout.weight_store import WeightStore

    engine = HFEngine(toy, dtype="float32", seed=0)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    w = bare_worker(engine, store)
    prompts = [engine.tokenizer("1+1=")["input_ids"], engine.tokenizer("x")["input_ids"]]
    assert w.sync_weights() == 0  # nothing published yet

    good = state_dict_to_blob(perturbed(toy_state, 1))
    fp = blob_fingerprint(good)
    ray.get(store.publish.remote(1, [ray.put(good)], 5, fp))
    version, _, steps, published_fp = ray.get(store.latest.remote())
    assert (version, steps, published_fp) == (1, 5, fp)
    assert w.sync_weights() == 1 and w.loaded_steps == 5 and w.stats["weight_loads"] == 1
    before = greedy(engine, prompts)

    # Version 2 arrives corrupted (one byte of tensor data flipped in transit).
    nxt = state_dict_to_blob(perturbed(toy_state, 2))
    bad = bytearray(nxt)
    bad[-5] ^= 0x40
    ray.get(store.publish.remote(2, [ray.put(bytes(bad))], 6, blob_fingerprint(nxt)))
    with pytest.raises(WeightSyncError) as e:
        w.sync_weights(min_steps=6)
    assert "version 2" in str(e.value) and blob_fingerprint(nxt) in str(e.value)
    assert engine.version == 1 and greedy(engine, prompts) == before  # never loaded
    # re-publishing the same version keeps its fingerprint; a fixed object loads
    ray.get(store.publish.remote(2, [ray.put(nxt)], 7))
    assert ray.get(store.latest.remote())[3] == blob_fingerprint(nxt)
    assert w.sync_weights(min_steps=7) == 2 and w.loaded_steps == 7


def test_worker_sync_refuses_a_load_the_engine_does_not_hold(ray_session: None, toy: Path,
                                                              toy_state: dict) -> None:
    import ray

    from rollout.hf_engine import HFEngine
    from rollout.weight_store import WeightStore

    fake = NoOpLoadEngine(HFEngine(toy, dtype="float32", seed=0))
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    w = bare_worker(fake, store)
    blob = state_dict_to_blob(perturbed(toy_state, 3))
    ray.get(store.publish.remote(1, [ray.put(blob)], 1, blob_fingerprint(blob)))
    for _ in range(2):  # every later sync tries again and refuses again: never generates
        with pytest.raises(WeightSyncError, match="version 1 were not loaded"):
            w.sync_weights(min_steps=0)
    assert w.stats["weight_loads"] == 0


def test_fetches_that_never_resolve_time_out(ray_session: None, toy: Path) -> None:
    import ray

    from rollout.hf_engine import HFEngine
    from rollout.weight_store import WeightStore

    Gate, BlockedStore = gate_classes()
    engine = HFEngine(toy, dtype="float32", seed=0)
    gate = ray.remote(Gate).options(num_cpus=0, max_concurrency=2).remote()
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    never = gate.wait.remote(b"")  # resolves only when the gate opens
    ray.get(store.publish.remote(1, [never], 1, "sha256:00"))
    w = bare_worker(engine, store, timeout_s=1.0)
    try:
        with pytest.raises(WeightSyncTimeout) as e:
            w.sync_weights()
        assert "version 1" in str(e.value) and "1 s" in str(e.value)
        assert engine.version == 0 and w.weights.error is None  # old weights still usable
    finally:
        ray.get(gate.open.remote())

    hung = ray.remote(BlockedStore).options(num_cpus=0, max_concurrency=2).remote()
    w = bare_worker(engine, hung, timeout_s=1.0)
    try:
        with pytest.raises(WeightSyncTimeout, match="weight store"):
            w.sync_weights()
    finally:
        ray.get(hung.open.remote())


# ------------------------------------------------- NCCL update, rollout side (fake transfer)


class FakeTransferEngine:
    """Stands in for a VLLMEngine built with weight_transfer nccl: `update_weights` copies
    the given state into an hf engine (as the broadcast would), or nothing (a lost update)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls, self.next_state = inner, [], None

    @property
    def version(self) -> int:
        return self.inner.version

    def set_version(self, v: int) -> None:
        self.inner._version = v

    def weight_transfer_rpc(self, method: str, *args: Any, timeout: float | None = None) -> None:
        self.calls.append(method)
        if method == "update_weights" and self.next_state is not None:
            with torch.no_grad():
                self.inner.model.load_state_dict(self.next_state, strict=False)

    def weights_report(self) -> list[dict]:
        return self.inner.weights_report()


def test_nccl_update_is_verified_before_generation(toy: Path, toy_state: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from rollout.hf_engine import HFEngine

    monkeypatch.setenv(TIMEOUT_ENV, "30")
    fake = FakeTransferEngine(HFEngine(toy, dtype="float32", seed=0))
    w = bare_worker(fake, store=None)
    w.weights.error = None
    new = perturbed(toy_state, 4)
    fake.next_state = new
    w.start_weight_update(1)
    assert w._engine_lock.locked() and w.weights.error is not None
    w.update_weights(SimpleNamespace(update_info={}))
    w.finish_weight_update(1, select_probes(new))
    assert fake.version == 1 and w.weights.error is None and not w._engine_lock.locked()

    fake.next_state = None  # the broadcast was lost: the engine still has version 1's weights
    w.start_weight_update(2)
    w.update_weights(SimpleNamespace(update_info={}))
    with pytest.raises(WeightSyncError, match="version 2 were not loaded"):
        w.finish_weight_update(2, select_probes(perturbed(toy_state, 5)))
    assert fake.version == 1 and not w._engine_lock.locked()
    with pytest.raises(WeightSyncError, match="not generating"):
        w.weights.check_usable()


def test_nccl_update_that_never_finishes_is_abandoned(toy: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from rollout.hf_engine import HFEngine

    monkeypatch.setenv(TIMEOUT_ENV, "0.2")
    fake = FakeTransferEngine(HFEngine(toy, dtype="float32", seed=0))
    w = bare_worker(fake, store=None)
    w.start_weight_update(3)  # ... and the learner never comes back
    # The watchdog releases the engine (waited for without a deadline race: up to 60 s).
    assert w._engine_lock.acquire(timeout=60)
    w._engine_lock.release()
    assert "did not finish within 0.2 s" in (w.weights.error or "")
    with pytest.raises(WeightSyncError, match="version 3"):
        w.weights.check_usable()
    with pytest.raises(WeightSyncError):  # a late finish is refused, the lock stays free
        w.finish_weight_update(3, {})
    assert not w._engine_lock.locked()


def test_nccl_group_rank_offsets() -> None:
    from learner.weight_sync import rank_offsets

    assert rank_offsets([1]) == ([1], 2)
    assert rank_offsets([2, 2, 1]) == ([1, 3, 5], 6)
    with pytest.raises(ValueError):
        rank_offsets([0])
