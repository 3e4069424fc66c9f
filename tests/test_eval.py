"""Evaluation: the pass@k estimator, the metrics and their breakdowns, eval jobs end to end
(`nebula eval`'s Python entry: Ray rollout workers with the hf engine, the embedded
verifier service), their determinism under one seed, bad input refused before generation,
the metrics of a training job's evaluations, and an eval job through the real REST API."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from nebula.config import ConfigError, load_file, load_model
from nebula.evaluation import (EvalJobConfig, evaluation_metrics, flat_scalars, pass_at_k,
                               results_markdown, summarize)
from procs import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the estimator -----------------------------------------------------------------------


def test_pass_at_k_hand_computed() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)   # c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)   # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0                  # n - c < k: every k-subset has a pass
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)  # k > n
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)  # c > n


def test_pass_at_k_equals_brute_force_over_subsets() -> None:
    """The share of k-subsets of the n samples with at least one pass, enumerated."""
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    # Large n: the product form stays finite and matches the exact binomials.
    for n, c, k in [(200, 3, 10), (500, 1, 100), (1000, 250, 50)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)


# -- metrics -----------------------------------------------------------------------------


def _p(ds: str, dom: str, passed: list[int], lengths: list[int] | None = None,
       trunc: list[int] | None = None, index: int = 0) -> dict[str, Any]:
    n = len(passed)
    return {"index": index, "dataset": ds, "domain": dom, "passed": [bool(x) for x in passed],
            "lengths": lengths or [3] * n, "truncated": [bool(x) for x in trunc or [0] * n],
            "errors": 0}


def test_metrics_breakdowns_lengths_truncation_and_table() -> None:
    sampled = [_p("a", "x", [1, 1, 0, 0, 0], [2, 4, 6, 8, 10], [0, 0, 0, 0, 1]),
               _p("a", "y", [0, 0, 0, 0, 0], index=1),
               _p("b", "x", [1, 1, 1, 1, 1], index=0)]
    greedy = [_p("a", "x", [1]), _p("a", "y", [0], index=1), _p("b", "x", [1])]
    m = evaluation_metrics(sampled, greedy, ks=[1, 2])
    a = m["all"]
    assert a["prompts"] == 3 and a["samples"] == 5
    assert a["pass@1"] == pytest.approx((0.4 + 0 + 1) / 3)
    assert a["pass@2"] == pytest.approx((0.7 + 0 + 1) / 3)
    assert a["mean@5"] == pytest.approx(7 / 15) and a["greedy"] == pytest.approx(2 / 3)
    assert a["completion_len_mean"] == pytest.approx((30 + 15 + 15) / 15)
    assert a["truncation_rate"] == pytest.approx(1 / 15)
    assert set(m["by_dataset"]) == {"a", "b"} and set(m["by_domain"]) == {"x", "y"}
    assert m["by_dataset"]["a"]["pass@2"] == pytest.approx(0.35)
    assert m["by_dataset"]["b"]["greedy"] == 1.0
    assert m["by_domain"]["x"]["pass@1"] == pytest.approx(0.7)
    md = results_markdown(m, [1, 2], 5, True)
    assert "| set | prompts | greedy | pass@1 | pass@2 | mean@5 |" in md
    assert "| dataset a | 2 |" in md and "| domain y | 1 |" in md
    tags = flat_scalars(m)
    assert tags["eval/pass@2"] == pytest.approx(a["pass@2"])
    assert "eval/dataset/b/greedy" in tags and "eval/domain/x/mean@5" in tags
    with pytest.raises(ValueError, match="same n"):
        summarize([_p("a", "x", [1, 0]), _p("a", "x", [1])], [1])
    with pytest.raises(ValueError, match="pass@3"):
        summarize([_p("a", "x", [1, 0])], [3])


def test_k_larger_than_samples_is_a_config_error_naming_the_field() -> None:
    from nebula.config.job import EvalConfig

    base = {"kind": "eval", "model": {"path": "/m"}, "datasets": [{"path": "/d.jsonl"}]}
    with pytest.raises(ConfigError) as ei:
        load_model(EvalJobConfig, {**base, "sampling": {"n": 4}, "k": [1, 8]})
    assert [e["field"] for e in ei.value.errors] == ["k"]
    assert "sampling.n (4)" in str(ei.value)
    assert load_model(EvalJobConfig, {**base, "sampling": {"n": 8}, "k": [8, 1, 8]}).k == [1, 8]
    with pytest.raises(ConfigError) as ei:
        load_model(EvalConfig, {"samples": 2, "k": [4]}, source="eval")
    assert ei.value.errors[0]["field"] == "k" and "eval.samples (2)" in str(ei.value)
    assert EvalConfig().samples == 4 and EvalConfig().k == [1]


def test_shipped_eval_config_loads() -> None:
    cfg = load_file(EvalJobConfig, ROOT / "examples/toy/eval.yaml")
    assert cfg.kind == "eval" and cfg.k == [1, 2, 4, 8] and cfg.sampling.n == 8
    assert max(cfg.k) <= cfg.sampling.n


def test_training_job_eval_rows_report_the_same_metrics(tmp_path: Path) -> None:
    """JobRunner._eval_record: the old keys stay, pass@k / mean@n / lengths / truncation
    (overall and by domain) come from nebula.evaluation, and TensorBoard gets them."""
    from nebula.config.job import JobConfig
    from services.runner import JobRunner

    cfg = load_model(JobConfig, {
        "output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "m")},
        "datasets": {"train": [{"path": "/t.jsonl"}], "eval": {"path": "/e.jsonl"}},
        "stages": [{"type": "sft", "steps": 1}], "eval": {"samples": 4, "k": [1, 4]}})
    runner = JobRunner(cfg, job_id="t", log=lambda s: None)
    det = lambda passed, dom: {"index": 0, "domain": dom, "passed": passed,  # noqa: E731
                               "lengths": [2] * len(passed), "truncated": [False] * len(passed),
                               "errors": 0}
    greedy = {"version": 3, "prompts": 2, "accuracy": 0.5, "by_domain": {"x": 1.0, "y": 0.0},
              "details": [det([True], "x"), det([False], "y")]}
    sampled = {"version": 3, "prompts": 2, "accuracy": 0.375,
               "by_domain": {"x": 0.75, "y": 0.0},
               "details": [det([True, True, True, False], "x"), det([False] * 4, "y")]}
    runner._eval_record([greedy, sampled], "after stage 0 (sft)", eval_s=1.0)
    (row,) = runner.summary["evals"]
    assert row["greedy"] == 0.5 and row["sampled"] == 0.375 and row["version"] == 3
    assert row["greedy_by_domain"] == {"x": 1.0, "y": 0.0}
    assert row["sampled_by_domain"] == {"x": 0.75, "y": 0.0}
    assert row["mean@4"] == 0.375 and row["pass@1"] == 0.375 and row["pass@4"] == 0.5
    assert row["by_domain"]["x"]["pass@4"] == 1.0 and row["truncation_rate"] == 0.0
    assert row["completion_len_mean"] == 2.0 and row["eval_s"] == 1.0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# -- eval jobs end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random-init toy model and two small eval sets: exact answers (which it misses)
    and a regex the first characters of its completions match about half the time."""
    from nebula.config.job import ToyModelConfig
    from nebula.toy_model import build_toy_model

    tmp = tmp_path_factory.mktemp("evaltoy")
    model = build_toy_model(tmp / "model", ToyModelConfig(
        hidden_size=64, layers=2, heads=2, intermediate_size=128, max_position=64, seed=3))
    words = ["abc", "kmz", "qrs", "tuv", "bead", "zz", "lmno", "fig", "hij", "wxy"]
    rows = [{"prompt": f"rev {w}=", "answer": w[::-1], "pattern": "[a-m]",
             "domain": "short" if len(w) < 4 else "long"} for w in words]
    data = tmp / "rev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pat = tmp / "pattern.jsonl"
    pat.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return {"dir": tmp, "model": model, "data": data, "pattern": pat}


def eval_cfg(toy: dict[str, Path], out: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kind": "eval", "name": "toy-eval", "output_dir": str(toy["dir"] / out),
        "model": {"path": str(toy["model"])},
        "datasets": [{"path": str(toy["data"]), "verifier": "exact", "domain_field": "domain"},
                     {"path": str(toy["pattern"]), "verifier": "regex",
                      "reference_field": "pattern", "domain_field": "domain"}],
        "sampling": {"temperature": 1.0, "max_tokens": 6, "n": 4, "seed": 0},
        "k": [1, 2, 4], "greedy": True, "rollout": {"engine": "hf", "workers": 2,
                                                    "num_cpus": 0.5}}
    cfg.update(over)
    return cfg


class TestEvalJobs:
    """One local Ray for the class (each run starts its own Redis and verifier service)."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def ray_session(cls) -> Iterator[None]:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="nray-", dir="/tmp"),
                 logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()

    @pytest.fixture(scope="class")
    @classmethod
    def first(cls, toy: dict[str, Path]) -> dict[str, Any]:
        from services.evaluate import run_eval

        return run_eval(eval_cfg(toy, "e1"), log=lambda s: None)

    def test_toy_checkpoint_end_to_end(self, toy: dict[str, Path],
                                       first: dict[str, Any]) -> None:
        out = toy["dir"] / "e1"
        res = json.loads((out / "eval_results.json").read_text())
        m = res["metrics"]
        # 10 + 6 prompts, split over 2 workers and put back in order
        sampled = res["prompts"]["sampled"]
        assert [(p["dataset"], p["index"]) for p in sampled] == \
            [("rev", i) for i in range(10)] + [("pattern", i) for i in range(6)]
        assert all(len(p["passed"]) == 4 for p in sampled)
        assert all(len(p["passed"]) == 1 for p in res["prompts"]["greedy"])
        # the metrics are those of the per-prompt outcomes
        for k in (1, 2, 4):
            want = sum(pass_at_k(4, sum(p["passed"]), k) for p in sampled) / len(sampled)
            assert m["all"][f"pass@{k}"] == pytest.approx(want)
        assert m["all"]["pass@1"] == pytest.approx(m["all"]["mean@4"])
        assert m["all"]["pass@1"] <= m["all"]["pass@2"] <= m["all"]["pass@4"]
        assert set(m["by_dataset"]) == {"rev", "pattern"}
        assert set(m["by_domain"]) == {"short", "long"}
        pat = m["by_dataset"]["pattern"]
        assert 0 < pat["mean@4"] < 1 and pat["pass@4"] > pat["pass@1"]  # non-trivial
        assert all(1 <= n <= 6 for p in sampled for n in p["lengths"])
        assert 0 <= m["all"]["truncation_rate"] <= 1 and m["all"]["verifier_error_rate"] == 0
        assert m["all"]["completion_len_mean"] == pytest.approx(
            sum(sum(p["lengths"]) for p in sampled) / (4 * len(sampled)))
        md = (out / "eval_results.md").read_text()
        assert "| all | 16 |" in md and "| dataset pattern | 6 |" in md
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
        (row,) = first["evals"]
        assert row["sampled"] == m["all"]["mean@4"] and row["greedy"] == m["all"]["greedy"]

    def test_same_seed_same_numbers(self, toy: dict[str, Path], first: dict[str, Any]) -> None:
        from services.evaluate import run_eval

        again = run_eval(eval_cfg(toy, "e2"), log=lambda s: None)
        a = json.loads((toy["dir"] / "e1" / "eval_results.json").read_text())
        b = json.loads((toy["dir"] / "e2" / "eval_results.json").read_text())
        assert again["metrics"] == first["metrics"]
        assert a["prompts"] == b["prompts"]
        other = run_eval(eval_cfg(toy, "e3", sampling={"temperature": 1.0, "max_tokens": 6,
                                                       "n": 4, "seed": 1}), log=lambda s: None)
        c = json.loads((toy["dir"] / "e3" / "eval_results.json").read_text())
        assert c["prompts"]["sampled"] != a["prompts"]["sampled"]  # the seed matters
        assert c["prompts"]["greedy"] == a["prompts"]["greedy"]    # greedy does not
        assert other["metrics"]["all"]["greedy"] == first["metrics"]["all"]["greedy"]

    def test_unknown_verifier_refused_before_generation(self, toy: dict[str, Path]) -> None:
        from services.evaluate import EvalInputError, run_eval

        cfg = eval_cfg(toy, "e4")
        cfg["datasets"][1]["verifier"] = "no_such_verifier"
        with pytest.raises(EvalInputError, match=r"datasets\.1\.verifier: .*pattern\.jsonl"):
            run_eval(cfg, log=lambda s: None)
        assert not (toy["dir"] / "e4" / "eval_results.json").exists()


# -- bad input, before anything starts ---------------------------------------------------


def _preflight(cfg: dict[str, Any]) -> None:
    from services.evaluate import EvalRunner

    EvalRunner(load_model(EvalJobConfig, cfg)).preflight()


def test_bad_input_named_before_generation(toy: dict[str, Path]) -> None:
    from services.evaluate import EvalInputError

    tmp = toy["dir"]
    no_ref = tmp / "no_ref.jsonl"
    no_ref.write_text('{"prompt": "rev ab=", "answer": "ba"}\n{"prompt": "rev cd="}\n')
    cfg = eval_cfg(toy, "bad")
    cfg["datasets"][0]["path"] = str(no_ref)
    with pytest.raises(EvalInputError, match=rf"datasets\.0\.reference_field: {no_ref} row 1: missing "
                                             r"reference field 'answer'"):
        _preflight(cfg)

    garbled = tmp / "garbled.jsonl"
    garbled.write_text('{"prompt": "rev ab=", "answer": "ba"}\n{"prompt": \n')
    cfg["datasets"][0]["path"] = str(garbled)
    with pytest.raises(EvalInputError, match=rf"datasets\.0\.path: cannot read {garbled}"):
        _preflight(cfg)

    cfg["datasets"][0]["path"] = str(tmp / "missing.jsonl")
    with pytest.raises(EvalInputError, match=r"datasets\.0\.path: dataset file not found"):
        _preflight(cfg)

    ifeval = tmp / "ifeval.jsonl"
    ifeval.write_text(json.dumps({"prompt": "say hi", "answer": "",
                                  "instruction_id_list": ["x"]}) + "\n"
                      + json.dumps({"prompt": "say ho", "answer": ""}) + "\n")
    cfg["datasets"][0].update(path=str(ifeval), verifier="ifeval")
    with pytest.raises(EvalInputError, match=r"datasets\.0\.metadata_fields: verifier 'ifeval' "
                                             r"needs the row field 'instruction_id_list'"):
        _preflight(cfg)
    cfg["datasets"][0]["metadata_fields"] = ["instruction_id_list"]
    with pytest.raises(EvalInputError, match=rf"{ifeval} row 1: missing field "
                                             r"'instruction_id_list'"):
        _preflight(cfg)

    cfg = eval_cfg(toy, "bad", sampling={"max_tokens": 64, "n": 4})
    with pytest.raises(EvalInputError, match=r"sampling\.max_tokens: 64"):
        _preflight(cfg)
    cfg = eval_cfg(toy, "bad", model={"path": str(tmp / "nowhere")})
    with pytest.raises(EvalInputError, match=r"model\.path: no Hugging Face checkpoint"):
        _preflight(cfg)
    assert not (tmp / "bad").exists()  # nothing written


def test_model_from_a_job_dir_or_a_learner_checkpoint(toy: dict[str, Path]) -> None:
    """A job's output dir means its export; a learner checkpoint (DeepSpeed model states
    under its `latest` tag) is written over `base_model` into OUTPUT_DIR/model."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from services.evaluate import EvalInputError, resolve_model

    job = toy["dir"] / "job"
    shutil.copytree(toy["model"], job / "checkpoints" / "export", dirs_exist_ok=True)
    cfg = lambda **kw: load_model(EvalJobConfig, eval_cfg(toy, "conv", **kw))  # noqa: E731
    assert resolve_model(cfg(model={"path": str(job)}), log=lambda s: None) == \
        str(job / "checkpoints" / "export")

    ckpt = toy["dir"] / "ckpt"
    (ckpt / "v00000007").mkdir(parents=True, exist_ok=True)
    (ckpt / "latest").write_text("v00000007")
    model = AutoModelForCausalLM.from_pretrained(toy["model"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # other weights than the base's
    torch.save({"module": model.state_dict()}, ckpt / "v00000007" / "mp_rank_00_model_states.pt")
    with pytest.raises(EvalInputError, match=r"model\.path: .* learner checkpoint.*base_model"):
        resolve_model(cfg(model={"path": str(ckpt)}), log=lambda s: None)
    out = resolve_model(cfg(model={"path": str(ckpt)}, base_model=str(toy["model"])),
                        log=lambda s: None)
    assert out == str(toy["dir"] / "conv" / "model")
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert (Path(out) / "tokenizer.json").is_file()


def test_nebula_eval_cli_refuses_k_over_n(toy: dict[str, Path]) -> None:
    path = toy["dir"] / "k.yaml"
    path.write_text(yaml.safe_dump(eval_cfg(toy, "cli", k=[1, 5])))
    res = subprocess.run([sys.executable, "-m", "services", "eval", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "k:" in res.stderr and "larger than sampling.n (4)" in res.stderr
    assert str(path) in res.stderr


# -- over REST ---------------------------------------------------------------------------

import api_procs  # noqa: E402
from api_procs import api_server, module_redis, wait_for  # noqa: E402

api_work = api_procs.api_work  # the shared session fixture


@pytest.mark.slow
def test_eval_job_over_rest(api_work: Path, toy: dict[str, Path],
                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """`kind: eval` through the real API: same queue and tenants as training jobs (its
    record shows the eval row the dashboard draws); a bad one is a 422 naming the field."""
    cfg = {"tokens": {"tok-e": "evals"}, "default_quota": {"max_concurrent_jobs": 1, "cpus": 2}}
    job = eval_cfg(toy, "unused", rollout={"engine": "hf", "workers": 1})
    job.pop("output_dir")  # the service places it
    with module_redis(tmp_path_factory.mktemp("redis")) as url, \
            api_server(api_work, {**cfg, "redis_url": url}, "eval") as srv, \
            srv.client("tok-e") as c:
        bad = c.post("/v1/jobs", json={**job, "k": [1, 8]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "k"
        r = c.post("/v1/jobs", json=job)
        assert r.status_code == 201, r.text
        jid = r.json()["id"]
        final = wait_for(lambda: (v := c.get(f"/v1/jobs/{jid}").json())["state"] in
                         ("succeeded", "failed", "cancelled") and v, 240, "the eval job")
        logs = c.get(f"/v1/jobs/{jid}/logs").json()["lines"]
        assert final["state"] == "succeeded", (final["error"], logs[-30:])
        (row,) = final["evals"]
        assert {"greedy", "sampled", "pass@1", "pass@4", "mean@4", "by_dataset"} <= set(row)
        assert final["stage"] == "eval0" and final["step"] == final["total_steps"] == 2
        out = Path(final["config"]["output_dir"])
        res = json.loads((out / "eval_results.json").read_text())
        assert res["metrics"]["all"]["pass@4"] == row["pass@4"]
        assert any("| all | 16 |" in line for line in logs)
