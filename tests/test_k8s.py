"""k8s/ renders and validates offline, with no cluster: every overlay builds with kustomize;
the built-in kinds pass `kubernetes-validate --strict`; the KubeRay RayCluster/RayJob pass the
operator's CRD schemas (unknown fields rejected); the ConfigMap'd configs load in their
pydantic models; the objects point at each other (names, ports, mounts); and the RayCluster's
worker groups hold exactly what the overlay's job config asks for (nebula.resources)."""

from __future__ import annotations

import copy
import functools
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from procs import ROOT

K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir()
                  if (p / "kustomization.yaml").is_file())
CRDS = ROOT.parent / "shared" / "k8s-schemas"
JOB_MOUNT = "/etc/nebula/job.yaml"
# Each overlay's job file, and the example path that must be the same file (one copy).
JOB_FILES = {"dev": ("toy-job.yaml", "examples/cluster/toy-job.yaml"),
             "gpu": ("gpu-job.yaml", "examples/cluster/gpu-job.yaml")}
POOLS = {"learner_pool": "learner", "rollout_pool": "rollout"}
# Not the bare overlay name: conftest skips tests with a `gpu` keyword on CPU machines, and
# these render manifests only.
IDS = [f"overlay-{o}" for o in OVERLAYS]


def test_overlays_are_the_expected_ones() -> None:
    assert OVERLAYS == ["dev", "gpu"]


# ---------------------------------------------------------------- rendering helpers


def _kustomize_cmd() -> list[str]:
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    pytest.skip("needs kubectl (or kustomize) on PATH to render the k8s/ overlays")


@functools.lru_cache(maxsize=None)
def _render(overlay: str) -> tuple[str, tuple[dict[str, Any], ...]]:
    out = subprocess.run([*_kustomize_cmd(), str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout, tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def docs(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(overlay)[1]))


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def by_prefix(objs: list[dict[str, Any]], kind: str, base_name: str) -> dict[str, Any]:
    """A generated object (name + kustomize's hash suffix)."""
    names = (base_name, base_name + "-")
    found = [d for d in objs if d["kind"] == kind
             and (d["metadata"]["name"] == names[0] or d["metadata"]["name"].startswith(names[1]))]
    assert len(found) == 1, f"{kind} {base_name}*: {len(found)} found"
    return found[0]


def pod_templates(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template spec) of every workload, RayCluster groups included."""
    out = []
    for d in objs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((where, d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayCluster":
            out.append((where + "/head", d["spec"]["headGroupSpec"]["template"]["spec"]))
            out += [(f"{where}/{g['groupName']}", g["template"]["spec"])
                    for g in d["spec"].get("workerGroupSpecs", [])]
    return out


def host_port(addr: str) -> tuple[str, int]:
    if "://" in addr:
        u = urlparse(addr)
        return u.hostname or "", u.port or 0
    host, _, port = addr.rpartition(":")
    return host, int(port)


def service_port(objs: list[dict[str, Any]], name: str, port: int) -> dict[str, Any]:
    svc = one(objs, "Service", name)
    assert port in [p["port"] for p in svc["spec"]["ports"]], f"Service {name} has no port {port}"
    return svc


def job_config_text(objs: list[dict[str, Any]]) -> str:
    return one(objs, "ConfigMap", "nebula-job")["data"]["job.yaml"]


def job_config(objs: list[dict[str, Any]]) -> Any:
    from nebula.config.job import JobConfig

    return JobConfig.model_validate(yaml.safe_load(job_config_text(objs)))


# ---------------------------------------------------------------- rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_overlay_renders_the_whole_service(overlay: str) -> None:
    objs = docs(overlay)
    for kind, name in [("Namespace", "nebula"), ("Deployment", "nebula-api"),
                       ("Service", "nebula-api"), ("StatefulSet", "nebula-redis"),
                       ("Service", "nebula-redis"), ("Deployment", "nebula-verifier"),
                       ("Service", "nebula-verifier"), ("NetworkPolicy", None),
                       ("HorizontalPodAutoscaler", "nebula-verifier"),
                       ("Deployment", "nebula-teacher"), ("Service", "nebula-teacher"),
                       ("RayCluster", None), ("RayJob", None), ("ConfigMap", "nebula-job")]:
        one(objs, kind, name)
    by_prefix(objs, "ConfigMap", "nebula-api-config")
    by_prefix(objs, "Secret", "nebula-api-tokens")
    assert {d["metadata"].get("namespace") for d in objs if d["kind"] != "Namespace"} == {"nebula"}


def _validator() -> str:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    return str(exe) if exe.exists() else (shutil.which("kubernetes-validate") or "")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_builtin_kinds_are_valid_kubernetes(overlay: str, tmp_path: Path) -> None:
    exe = _validator()
    assert exe, "kubernetes-validate is a dev dependency"
    builtin = [d for d in docs(overlay) if not d["apiVersion"].startswith("ray.io/")]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    out = subprocess.run([exe, "-k", "1.30", "--strict", str(path)], capture_output=True,
                         text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    # A kind it has no schema for is a WARN ("Couldn't find schema"): that fails too.
    assert "WARN" not in text.upper() and "ERROR" not in text.upper(), text
    assert text.count("INFO") == len(builtin), text


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as the API server applies it with strict field validation:
    an object that lists its properties accepts no others (unless it preserves unknown
    fields); `x-kubernetes-*` keys are left for jsonschema to ignore."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str) -> Any:
    import jsonschema

    path = CRDS / {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS}")
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    v = _crd_validator(doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_ray_objects_match_the_kuberay_crds(overlay: str) -> None:
    ray = [d for d in docs(overlay) if d["apiVersion"].startswith("ray.io/")]
    assert sorted(d["kind"] for d in ray) == ["RayCluster", "RayJob"]
    for d in ray:
        assert d["apiVersion"] == "ray.io/v1"
        assert _crd_errors(d) == [], f"{d['kind']}/{d['metadata']['name']}"


def test_crd_validation_rejects_unknown_and_mistyped_fields() -> None:
    cluster = one(docs("dev"), "RayCluster")
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["rayStartParam"] = {"num-cpus": "1"}   # typo
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    bad["spec"]["workerGroupSpecs"][1]["replicas"] = "two"
    errors = "\n".join(_crd_errors(bad))
    assert "rayStartParam" in errors and "bogus" in errors and "'two'" in errors
    job = copy.deepcopy(one(docs("dev"), "RayJob"))
    job["spec"]["entryPoint"] = "x"
    assert any("entryPoint" in e for e in _crd_errors(job))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_configmapped_configs_load(overlay: str) -> None:
    from nebula.config import VerifierServiceConfig, load_model
    from nebula.config.teacher import TeacherServiceConfig
    from services.api.settings import ApiConfig

    objs = docs(overlay)
    cfg = job_config(objs)
    assert cfg.cluster.redis_url and cfg.cluster.verifier_address and cfg.cluster.ray_address
    api = by_prefix(objs, "ConfigMap", "nebula-api-config")["data"]["api.yaml"]
    load_model(ApiConfig, yaml.safe_load(api), "api.yaml")
    load_model(VerifierServiceConfig, yaml.safe_load(
        one(objs, "ConfigMap", "nebula-verifier-config")["data"]["verifier.yaml"]), "verifier")
    load_model(TeacherServiceConfig, yaml.safe_load(
        one(objs, "ConfigMap", "nebula-teacher-config")["data"]["teacher.yaml"]), "teacher")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_job_config_has_one_source(overlay: str) -> None:
    name, example = JOB_FILES[overlay]
    src = K8S / "overlays" / overlay / name
    assert (ROOT / example).resolve() == src.resolve(), f"{example} must be {src} (a symlink)"
    assert job_config_text(docs(overlay)) == src.read_text()
    from nebula.config import load_file
    from nebula.config.job import JobConfig

    load_file(JobConfig, ROOT / example)  # what `nebula run examples/cluster/...` loads


def test_base_lists_every_manifest() -> None:
    base = K8S / "base"
    k = yaml.safe_load((base / "kustomization.yaml").read_text())
    manifests = sorted(p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml"
                       and all("kind" in d for d in yaml.safe_load_all(p.read_text()) if d))
    assert sorted(k["resources"]) == manifests
    assert not list(K8S.glob("*.yaml")), "manifests live in k8s/base and k8s/overlays/*"


# ---------------------------------------------------------------- wiring


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_references_resolve(overlay: str) -> None:
    """Every ConfigMap, Secret and PVC a pod uses is rendered (hash suffixes included)."""
    objs = docs(overlay)
    have = {(d["kind"], d["metadata"]["name"]) for d in objs}
    claims = {f"StatefulSet/{d['metadata']['name']}": {t["metadata"]["name"]
              for t in d["spec"].get("volumeClaimTemplates", [])}
              for d in objs if d["kind"] == "StatefulSet"}
    for where, spec in pod_templates(objs):
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in have, (where, vol)
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in have, (where, vol)
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in have
        for c in spec["containers"]:
            assert c["image"].startswith(("nebula-rl:", "redis:")), (where, c["image"])
            if c["image"].startswith("nebula-rl"):
                assert c["image"] == "nebula-rl:latest", where
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])} | claims.get(where, set())
            assert mounts <= volumes, (where, mounts)
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = one(objs, "Secret", ref["name"])
                    assert ref["key"] in secret.get("data", {}), (where, ref)
    for d in objs:
        if d["kind"] == "StatefulSet":
            for t in d["spec"].get("volumeClaimTemplates", []):
                mounts = [m["name"] for c in d["spec"]["template"]["spec"]["containers"]
                          for m in c.get("volumeMounts", [])]
                assert t["metadata"]["name"] in mounts


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_api_submits_to_the_raycluster_and_uses_redis(overlay: str) -> None:
    objs = docs(overlay)
    api_cfg = yaml.safe_load(by_prefix(objs, "ConfigMap", "nebula-api-config")["data"]["api.yaml"])
    cluster = one(objs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    # KubeRay names the head's Service <cluster>-head-svc; 8265 is the dashboard / job API.
    assert api_cfg["ray_address"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= head_ports
    # Redis: the headless Service of the StatefulSet, which keeps an fsynced AOF on its PVC.
    host, port = host_port(api_cfg["redis_url"])
    sts = one(objs, "StatefulSet", host)
    svc = service_port(objs, host, port)
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == host
    args = " ".join(sts["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "--appendfsync always" in args
    data_dir = args.split("--dir ")[1].split()[0]
    (mount,) = [m for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                if m["mountPath"] == data_dir]
    assert mount["name"] in [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    # Tokens come from the Secret, as configs/api.yaml says; none are in the ConfigMap.
    assert not api_cfg.get("tokens") and not api_cfg.get("admin_tokens")
    dep = one(objs, "Deployment", "nebula-api")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    for name in ("NEBULA_API_TOKENS", "NEBULA_API_ADMIN_TOKENS"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"].startswith("nebula-api-tokens")
    assert c["command"][:2] == ["nebula", "serve"]
    service_port(objs, "nebula-api", api_cfg["port"])
    # The API's work_dir is on the volume the Ray head mounts at the same path (job drivers
    # run on the head and chdir into it).
    runs = _mount_of(dep["spec"]["template"]["spec"], c, "nebula-runs")
    assert api_cfg["work_dir"].startswith(runs + "/")
    head_spec = head["template"]["spec"]
    assert _mount_of(head_spec, head_spec["containers"][0], "nebula-runs") == runs


def _mount_of(spec: dict[str, Any], container: dict[str, Any], claim: str) -> str:
    vols = {v["name"] for v in spec.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    (path,) = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in vols]
    return path


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_job_reaches_services_and_runs_from_the_configmap(overlay: str) -> None:
    objs = docs(overlay)
    cfg = job_config(objs)
    assert cfg.cluster.ray_address == "auto"   # the driver runs on the head
    host, port = host_port(cfg.cluster.redis_url)
    one(objs, "StatefulSet", host)
    service_port(objs, host, port)
    host, port = host_port(cfg.cluster.verifier_address)
    service_port(objs, host, port)
    vcfg = yaml.safe_load(one(objs, "ConfigMap", "nebula-verifier-config")["data"]["verifier.yaml"])
    assert one(objs, "Service", host)["spec"]["ports"][0]["targetPort"] == "grpc"
    assert vcfg["port"] == port
    if cfg.cluster.teacher_address:
        service_port(objs, *host_port(cfg.cluster.teacher_address))
    # The RayJob targets the RayCluster and runs `nebula run` on the mounted job config.
    cluster, rayjob = one(objs, "RayCluster"), one(objs, "RayJob")
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert not rayjob["spec"].get("shutdownAfterJobFinishes")   # the cluster is shared
    assert rayjob["spec"]["entrypoint"].endswith(f"nebula run {JOB_MOUNT}")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    vols = {v["name"]: v for v in head["volumes"]}
    (m,) = [m for m in head["containers"][0]["volumeMounts"]
            if vols[m["name"]].get("configMap", {}).get("name") == "nebula-job"]
    assert f"{m['mountPath']}/job.yaml" == JOB_MOUNT
    # Every path the job reads or writes is on a volume every Ray pod mounts.
    paths = [cfg.output_dir, cfg.model.path, *(d.path for d in cfg.datasets.train)]
    if cfg.datasets.eval:
        paths.append(cfg.datasets.eval.path)
    for where, spec in pod_templates([cluster]):
        pvcs = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        roots = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] in pvcs]
        for p in paths:
            assert any(p.startswith(r + "/") for r in roots), (where, p, roots)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_verifier_is_isolated_and_autoscaled(overlay: str) -> None:
    objs = docs(overlay)
    dep = one(objs, "Deployment", "nebula-verifier")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (pol,) = [d for d in objs if d["kind"] == "NetworkPolicy"
              and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    assert "Egress" in pol["spec"]["policyTypes"] and pol["spec"].get("egress", []) == []
    hpa = one(objs, "HorizontalPodAutoscaler", "nebula-verifier")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "nebula-verifier"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA needs CPU requests to compute utilisation.
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]


# ---------------------------------------------------------------- resources


def quantity(q: Any) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """What one pod of a KubeRay group offers Ray: CPUs and GPUs from rayStartParams, else
    from the container's limits (else requests) as KubeRay passes them; custom resources
    from rayStartParams `resources` (a shell-quoted JSON object)."""
    params = group.get("rayStartParams", {})
    res = group["template"]["spec"]["containers"][0].get("resources", {})
    limits, requests = res.get("limits", {}), res.get("requests", {})
    cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    out = {"CPU": quantity(cpu), "GPU": quantity(gpu)}
    if "resources" in params:
        (text,) = shlex.split(params["resources"])
        out.update({k: float(v) for k, v in json.loads(text).items()})
    if "num-cpus" in params and "cpu" in limits:
        assert quantity(params["num-cpus"]) <= quantity(limits["cpu"])
    if "nvidia.com/gpu" in limits:   # Kubernetes: GPU requests equal limits when both given
        assert quantity(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == \
            quantity(limits["nvidia.com/gpu"])
    return out


def fits_per_pod(pod: dict[str, float], bundle: dict[str, float]) -> int:
    return int(min(pod.get(k, 0.0) / v for k, v in bundle.items() if v > 0) + 1e-9)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_worker_groups_hold_what_the_job_asks(overlay: str) -> None:
    from nebula.resources import job_resources, learner_bundle, rollout_bundle

    objs = docs(overlay)
    cfg = job_config(objs)
    cluster = one(objs, "RayCluster")
    head = ray_resources(cluster["spec"]["headGroupSpec"])
    assert head["CPU"] == 0 and head["GPU"] == 0, "actors stay off the head"
    groups: dict[str, tuple[dict[str, float], int]] = {}
    for g in cluster["spec"]["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pod = ray_resources(g)
        (pool,) = [p for p in POOLS if pod.get(p, 0) > 0]
        assert POOLS[pool] == g["groupName"] and pool not in groups
        groups[pool] = (pod, g["replicas"])
    assert set(groups) == set(POOLS)

    asks = {"learner_pool": (learner_bundle(cfg.learner), cfg.learner.ranks),
            "rollout_pool": (rollout_bundle(cfg.rollout), cfg.rollout.workers)}
    for pool, (bundle, count) in asks.items():
        assert bundle.get(pool) == 1.0, f"the job's {POOLS[pool]} actors ask for {pool}"
        pod, replicas = groups[pool]
        # Every actor of the pool is placed whole on one of the pool's pods ...
        assert fits_per_pod(pod, bundle) * replicas >= count, (pool, pod, bundle, count)
        # ... and the pool's GPUs are exactly the ones its actors ask for.
        assert pod["GPU"] * replicas == bundle.get("GPU", 0.0) * count, pool
    assert groups["learner_pool"][0]["GPU"] * groups["learner_pool"][1] == \
        cfg.learner.ranks * cfg.learner.num_gpus_per_rank
    assert groups["rollout_pool"][0]["GPU"] * groups["rollout_pool"][1] == \
        cfg.rollout.workers * cfg.rollout.num_gpus

    total = job_resources(cfg)
    offered: dict[str, float] = {}
    for pod, replicas in groups.values():
        for k, v in pod.items():
            offered[k] = offered.get(k, 0.0) + v * replicas
    for k, v in total.items():
        assert offered.get(k, 0.0) >= v, \
            f"{k}: the job asks {v:g}, the RayCluster offers {offered.get(k, 0.0):g}"
    assert offered["GPU"] == total["GPU"]
    assert (total["GPU"] > 0) == (overlay == "gpu")
    if overlay == "gpu":
        assert (cfg.learner.ranks, cfg.learner.num_gpus_per_rank) == (4, 1)
        ro = cfg.rollout
        assert (ro.workers, ro.tensor_parallel_size, ro.num_gpus) == (2, 2, 2)
        for g in cluster["spec"]["workerGroupSpecs"]:
            tolerations = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), g["groupName"]
