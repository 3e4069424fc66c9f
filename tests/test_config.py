"""Every shipped config file loads; bad config errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nebula.config import ConfigError, VerifierServiceConfig, load_file, load_model
from procs import ROOT


def shipped_configs() -> list[Path]:
    found = sorted((ROOT / "configs").glob("*.y*ml")) + sorted((ROOT / "examples").rglob("*.y*ml"))
    return [p for p in found if p.is_file()]


def config_model_for(path: Path) -> type:
    from nebula.config.job import JobConfig

    from nebula.config.teacher import TeacherServiceConfig

    from services.api.settings import ApiConfig

    data = yaml.safe_load(path.read_text()) or {}
    if data.get("kind") == "eval":
        from nebula.evaluation import EvalJobConfig

        return EvalJobConfig
    if "stages" in data:
        return JobConfig
    if "tokens" in data or "quotas" in data:
        return ApiConfig
    return TeacherServiceConfig if "teachers" in data else VerifierServiceConfig


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_loads(path: Path) -> None:
    load_file(config_model_for(path), path)


def test_configmaps_in_k8s_hold_valid_configs() -> None:
    seen = 0
    for path in sorted((ROOT / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "ConfigMap":
                continue
            for key, text in (doc.get("data") or {}).items():
                from nebula.config.teacher import TeacherServiceConfig

                model = {"verifier.yaml": VerifierServiceConfig,
                         "teacher.yaml": TeacherServiceConfig}.get(key)
                if model is not None:
                    load_model(model, yaml.safe_load(text), f"{path}:{key}")
                    seen += 1
    assert seen >= 2


def test_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as ei:
        load_model(VerifierServiceConfig, {"port": "x", "sandbox": {"memory_mb": -1, "bogus": 1}})
    fields = {e["field"] for e in ei.value.errors}
    assert fields == {"port", "sandbox.memory_mb", "sandbox.bogus"}
    assert "sandbox.memory_mb" in str(ei.value)


def test_autocast_needs_fp32_weights() -> None:
    from nebula.config.job import JobConfig

    job = {"name": "j", "model": {"path": "toy:", "dtype": "bfloat16"},
           "datasets": {"train": [{"path": "d.jsonl"}]}, "stages": [{"type": "grpo", "steps": 1}],
           "learner": {"autocast": "bfloat16"}}
    with pytest.raises(ConfigError, match="learner.autocast: bfloat16 autocasts over fp32"):
        load_model(JobConfig, job)
    job["model"]["dtype"] = "float32"
    assert load_model(JobConfig, job).learner.autocast == "bfloat16"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_file(VerifierServiceConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_file(VerifierServiceConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_file(VerifierServiceConfig, lst)


def test_config_and_registries_import_nothing_heavy() -> None:
    """Entry modules read config before anything heavy: the config tree and the algorithm and
    environment registries load without torch, transformers, vllm or deepspeed."""
    import subprocess
    import sys

    code = ("import sys, nebula.config.job, nebula.algo, nebula.env; "
            "nebula.algo.algorithms(); nebula.env.environments(); "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'deepspeed', 'ray') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
