"""The admission policy on its own (pure functions of job records): per-tenant quotas of
jobs, CPUs and GPUs counted from the job's config (`nebula.resources.job_resources`);
priority, then FIFO; no overtaking; positions per tenant. Then on a real Redis, and against a
real `nebula serve`: a job larger than its tenant's quota or than the embedded Ray cluster
is refused at submission with the numbers."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

import api_procs
from api_procs import BASE_CFG, api_server, module_redis, toy_job
from services.api.settings import Quota
from services.jobs.launcher import RayLauncher
from services.jobs.queue import admit, fits_at_all, needs, positions, resources


def rec(i: int, tenant: str = "t", state: str = "queued", priority: int = 0,
        cpus: float = 2.0, gpus: float = 0.0) -> dict[str, Any]:
    return {"id": f"j{i}", "tenant": tenant, "state": state, "priority": priority,
            "qseq": i, "cpus": cpus, "gpus": gpus}


def job(**over: Any) -> dict[str, Any]:
    """A minimal valid job config (nothing is read: the queue only counts)."""
    return {"model": {"path": "/m"}, "datasets": {"train": [{"path": "/d.jsonl"}]},
            "stages": [{"type": "grpo", "steps": 1}], **over}


def test_needs_counts_learner_and_rollout_actors() -> None:
    assert needs(job(rollout={"workers": 3, "num_cpus": 2, "num_gpus": 1})) == (7.0, 3.0)
    assert needs(job()) == (2.0, 0.0)  # 1 learner rank + 1 rollout worker, 1 CPU each


def test_a_multi_rank_gpu_learner_counts_every_rank() -> None:
    """2 ranks x 1 GPU of the learner + 2 rollout workers x 2 GPUs (tensor parallel 2):
    exactly what the job reserves in Ray, custom resources included."""
    from nebula.config.job import JobConfig
    from nebula.resources import job_resources

    cfg = job(learner={"ranks": 2, "num_gpus_per_rank": 1, "num_cpus_per_rank": 4,
                       "resources_per_rank": {"node_gpu_a": 1}},
              rollout={"workers": 2, "num_gpus": 2, "num_cpus": 2, "tensor_parallel_size": 2,
                       "resources": {"rollout_pool": 1}})
    assert needs(cfg) == (2 * 4 + 2 * 2, 2 * 1 + 2 * 2)
    assert resources(cfg) == {"CPU": 12.0, "GPU": 6.0, "node_gpu_a": 2.0, "rollout_pool": 2.0}
    assert resources(cfg) == job_resources(JobConfig.model_validate(cfg))
    # An eval job has no learner: its rollout workers only.
    ev = {"kind": "eval", "model": {"path": "/m"}, "datasets": [{"path": "/d.jsonl"}],
          "rollout": {"workers": 3, "num_cpus": 2, "num_gpus": 1}}
    assert resources(ev) == {"CPU": 6.0, "GPU": 3.0}


def test_priority_then_fifo_and_positions_per_tenant() -> None:
    jobs = [rec(1), rec(2, priority=5), rec(3), rec(4, tenant="u")]
    assert positions(jobs) == {"j2": 1, "j1": 2, "j3": 3, "j4": 1}
    quotas = {"t": Quota(max_concurrent_jobs=2), "u": Quota(max_concurrent_jobs=0)}
    assert admit(jobs, quotas.__getitem__) == ["j2", "j1"]


def test_running_jobs_use_up_the_quota_and_nothing_overtakes() -> None:
    q = Quota(max_concurrent_jobs=5, cpus=6, gpus=1)
    jobs = [rec(1, state="running", cpus=3), rec(2, cpus=4), rec(3, cpus=1)]
    assert admit(jobs, lambda t: q) == []  # j2 does not fit; j3 would, but waits its turn
    jobs[0]["state"] = "cancelled"
    assert admit(jobs, lambda t: q) == ["j2", "j3"]
    gpu = [rec(1, state="starting", gpus=1), rec(2, gpus=0.5)]
    assert admit(gpu, lambda t: q) == []


def test_a_job_larger_than_the_quota_is_refused_up_front() -> None:
    assert fits_at_all((3, 0), Quota(cpus=2)) is not None
    assert fits_at_all((1, 2), Quota(gpus=1)) is not None
    assert fits_at_all((3, 2), Quota()) is None
    assert fits_at_all((2, 2), Quota(cpus=2, gpus=2)) is None
    cfg = job(learner={"ranks": 2, "num_gpus_per_rank": 1},
              rollout={"workers": 2, "num_gpus": 1})
    why = fits_at_all(needs(cfg), Quota(gpus=3), cfg)
    assert why == ("the job needs 4 GPUs (learner ranks 2 x 1 + rollout workers 2 x 1), "
                   "the tenant's quota is 3 GPUs")


# -- on a real Redis ------------------------------------------------------------------------


@pytest.fixture
def store(redis_url: str) -> Any:
    from services.jobs.store import JobStore

    st = JobStore.from_url(redis_url)
    st.r.flushdb()
    return st


def make(store: Any, i: int, tenant: str = "t", priority: int = 0) -> str:
    job_id = f"j{i:04d}"
    store.create({"id": job_id, "tenant": tenant, "name": "n", "state": "queued",
                  "priority": priority, "config": {"big": "x" * 1000}, "cpus": 2.0,
                  "gpus": 0.0, "attempt": 0})
    return job_id


def redis_positions(store: Any) -> dict[str, int]:
    views = store.views(store.get_many(sorted(store.r.smembers("nebula:api:active"))))
    return {v["id"]: v["queue_position"] for v in views if v["state"] == "queued"}


def test_queue_sets_follow_priority_fifo_cancel_and_requeue(store: Any) -> None:
    from services.jobs.keys import ACTIVE

    ids = [make(store, i, tenant="t" if i % 3 else "u", priority=(5 if i == 4 else 0))
           for i in range(1, 10)]
    assert redis_positions(store) == positions(store.active_records())
    assert redis_positions(store)["j0004"] == 1
    store.transition(ids[1], ACTIVE, "cancelled")
    store.transition(ids[0], {"queued"}, "starting")
    assert ids[0] not in redis_positions(store) and ids[1] not in redis_positions(store)
    assert redis_positions(store) == positions(store.active_records())
    store.transition(ids[1], {"cancelled"}, "queued", requeue=True)  # a resume: last in line
    pos = redis_positions(store)
    assert pos == positions(store.active_records())
    assert pos[ids[1]] == max(p for i, p in pos.items() if store.get(i)["tenant"] == "t")
    # The views of a GET and a list page agree with the decoded views.
    for job_id in ids:
        whole = store.view(store.get(job_id))
        assert json.loads(store.view_json(job_id, None)) == whole
        assert json.loads(store.view_json(job_id, whole["tenant"])) == whole
        assert store.view_json(job_id, "someone-else") is None
    assert [json.loads(v) for v in store.views_json(ids)] == store.views(store.get_many(ids))
    # Records from before the queue sets existed: an API start rebuilds them.
    for k in store.r.keys("nebula:api:tenant:*:queue"):
        store.r.delete(k)
    assert store.rebuild_queues() == len(pos)
    assert redis_positions(store) == pos


def test_queue_position_reads_stay_flat_with_many_active_jobs(store: Any) -> None:
    """A status read costs the same with 3 or 300 queued jobs (no scan of the active set)."""
    from services.jobs.keys import ApiKeys

    for i in range(300):
        make(store, i)
    assert store.r.zcard(ApiKeys.tenant_queue("t")) == 300
    calls = []
    orig = store.r.execute_command

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(args[0])
        return orig(*args, **kw)

    store.r.execute_command = counting  # type: ignore[method-assign]
    view = json.loads(store.view_json("j0299", "t"))
    assert view["queue_position"] == 300
    assert calls == []  # everything went through the one pipeline


class FlakyLauncher:
    """Ray's job head refusing submissions for a while, as right after it started."""

    embedded = False  # a configured cluster: its jobs' files are not the service's to check

    def __init__(self, fails: int, error: str) -> None:
        self.fails, self.error, self.submitted = fails, error, []

    @staticmethod
    def ray_job_id(job_id: str, attempt: int) -> str:
        return job_id

    def submit(self, job_id: str, attempt: int) -> str:
        if self.fails:
            self.fails -= 1
            raise RuntimeError(self.error)
        self.submitted.append(job_id)
        return job_id

    def status(self, ray_job_id: str) -> Any:
        from services.jobs.launcher import RayStatus

        return RayStatus("RUNNING" if ray_job_id in self.submitted else None)

    @staticmethod
    def capacity() -> None:
        return None  # unknown: nothing refused for the cluster's size

    retryable = staticmethod(RayLauncher.retryable)
    already_submitted = staticmethod(RayLauncher.already_submitted)


NO_AGENT = ("Request failed with status code 500: No available agent to submit job, please "
            "try again later.")


def service(store: Any, launcher: Any, tmp_path: Path, retry_s: float = 60.0) -> Any:
    from services.api.settings import ApiConfig
    from services.jobs.service import JobService

    return JobService(ApiConfig(work_dir=str(tmp_path), submit_retry_s=retry_s), store, launcher)


def test_a_passing_submit_error_is_retried_not_fatal(store: Any, tmp_path: Path) -> None:
    launcher = FlakyLauncher(2, NO_AGENT)
    svc = service(store, launcher, tmp_path)
    job = make(store, 1)
    svc.schedule()
    rec = store.get(job)
    assert rec["state"] == "starting" and rec["submit_retry"]["tries"] == 1
    svc.reconcile()  # not in Ray yet: reconciliation leaves it alone
    assert store.get(job)["state"] == "starting"
    deadline = time.monotonic() + 10
    while not launcher.submitted and time.monotonic() < deadline:
        time.sleep(0.1)
        svc.schedule()
    assert launcher.submitted == [job]
    rec = store.get(job)
    assert rec["state"] == "starting" and rec["submit_retry"] is None
    assert any("retrying" in x for x in store.read_logs(job, None, 100)[0])


def test_submit_errors_fail_the_job_when_permanent_or_too_long(store: Any, tmp_path: Path) -> None:
    svc = service(store, FlakyLauncher(1, "Request failed with status code 400: bad "
                                       "runtime_env"), tmp_path)
    job = make(store, 1)
    svc.schedule()
    rec = store.get(job)
    assert rec["state"] == "failed" and "bad runtime_env" in rec["error"]
    svc = service(store, FlakyLauncher(1000, NO_AGENT), tmp_path, retry_s=1.0)
    job = make(store, 2)
    deadline = time.monotonic() + 20
    while store.get(job)["state"] == "starting" or store.get(job)["state"] == "queued":
        assert time.monotonic() < deadline
        svc.schedule()
        time.sleep(0.2)
    rec = store.get(job)
    assert rec["state"] == "failed" and "No available agent" in rec["error"]
    assert "gave up after" in rec["error"]


def test_reporter_shows_each_stage_end_and_steps_from_metrics(store: Any, tmp_path: Path) -> None:
    """Progress polls that miss a stage's last steps: the runner's summary and the metrics
    stream still bring the record to the stage's end; nothing ever goes back."""
    from nebula.transport.pacing import JobKeys
    from services.jobs.process import Reporter

    job = make(store, 1)

    class Runner:
        summary: dict[str, Any] = {"stages": [], "evals": []}

    rep = Reporter(store, job, tmp_path / "ck", [20, 4])
    rep.runner = Runner()
    rep({"stage": "sft0", "step": 13, "total": 20})
    assert (store.get(job)["stage"], store.get(job)["step"]) == ("sft0", 13)
    Runner.summary["stages"].append({"stage": "sft0", "steps": 20})
    rep.tick()
    rec = store.get(job)
    assert (rec["stage"], rec["step"], rec["total_steps"]) == ("sft0", 20, 20)
    rep({"stage": "sft0", "step": 19, "total": 20})  # a late poll
    assert store.get(job)["step"] == 20
    # The learner's metrics rows count every stage's steps: global 22 = grpo1 step 2.
    store.r.xadd(JobKeys(job).metrics, {"m": json.dumps({"stage": "grpo1", "step": 22})})
    rep.tick()
    rec = store.get(job)
    assert (rec["stage"], rec["step"], rec["total_steps"]) == ("grpo1", 2, 4)
    Runner.summary["stages"].append({"stage": "grpo1", "steps": 4})
    rep.finish(Runner.summary)
    view = store.view(store.get(job))
    assert (view["stage"], view["step"], view["total_steps"]) == ("grpo1", 4, 4)


# -- against a real `nebula serve` and its embedded Ray ---------------------------------------

api_work = api_procs.api_work  # the shared session fixture (work dir, embedded Ray)
TOKENS = {"tok-cap": "cap", "tok-q": "quota"}


@pytest.fixture(scope="module")
def srv(api_work: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cfg = {"tokens": TOKENS, "default_quota": {"max_concurrent_jobs": 0},
           "quotas": {"quota": {"max_concurrent_jobs": 0, "gpus": 1}}}
    with module_redis(tmp_path_factory.mktemp("redis")) as url, \
            api_server(api_work, {**cfg, "redis_url": url}, "queue") as s:
        yield s


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return toy_job(tmp_path_factory.mktemp("toyjob"))


def test_jobs_larger_than_the_quota_or_the_cluster_are_refused_with_the_numbers(
        srv: Any, toy: dict[str, Any]) -> None:
    """The embedded Ray of the API tests has 8 CPUs (and this machine's GPUs, if any): a job
    asking more fails at submission (422, nothing queued), naming asked and available,
    instead of waiting forever for its placement."""
    ray_cpus = BASE_CFG["ray_num_cpus"]
    two_gpu_ranks = {**toy, "learner": {**toy["learner"], "ranks": 2, "num_gpus_per_rank": 1}}
    with srv.client("tok-q") as q:
        r = q.post("/v1/jobs", json=two_gpu_ranks)
        assert r.status_code == 422, r.text
        err = r.json()["detail"][0]
        assert err["type"] == "quota" and err["field"] == "learner"
        assert err["message"] == ("the job needs 2 GPUs (learner ranks 2 x 1), the tenant's "
                                  "quota is 1 GPUs")
    huge = {**toy, "learner": {**toy["learner"], "ranks": 4, "num_cpus_per_rank": 4,
                               "num_gpus_per_rank": 64, "resources_per_rank": {"node_gpu_a": 1}}}
    with srv.client("tok-cap") as c:
        r = c.post("/v1/jobs", json=huge)
        assert r.status_code == 422, r.text
        err = r.json()["detail"][0]
        assert err["type"] == "capacity" and err["field"] == "learner, rollout", err
        msg = err["message"]
        assert msg.startswith("the job asks for more than the Ray cluster has ("), msg
        assert f"CPU: asked 17, the Ray cluster has {ray_cpus}" in msg  # 4 x 4 + 1 rollout
        assert re.search(r"GPU: asked 256, the Ray cluster has \d+", msg), msg
        assert "node_gpu_a: asked 4, the Ray cluster has 0" in msg
        more_rollout = {**toy, "rollout": {**toy["rollout"], "workers": ray_cpus}}
        r = c.post("/v1/jobs", json=more_rollout)  # 1 + 8 CPUs
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "capacity", r.text
        assert (f"CPU: asked {ray_cpus + 1}, the Ray cluster has {ray_cpus}"
                in r.json()["detail"][0]["message"])
        assert c.get("/v1/jobs").json()["jobs"] == []  # nothing was written
        fits = {**toy, "rollout": {**toy["rollout"], "workers": ray_cpus - 1}}  # 8 of 8 CPUs
        r = c.post("/v1/jobs", json=fits)
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "queued"  # (quota 0 jobs: it never starts here)
