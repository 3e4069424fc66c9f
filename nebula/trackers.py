"""Optional experiment trackers (Weights & Biases, MLflow) beside the always-on
metrics.jsonl and TensorBoard files: `logging.wandb` / `logging.mlflow` in the job config
(install the `trackers` extra: `pip install 'nebula-rl[trackers]'`).

Every tracker gets the TensorBoard scalars under their TensorBoard names: per-step rows as
`{stage}/{key}` at the learner's global step, eval rows as `eval/...` at the policy version.
(MLflow allows only letters, digits and `_ - . / space` in a metric name: `@` becomes `_at_`
there, e.g. `eval/pass_at_4`, any other character `_`.)"""

from __future__ import annotations

import importlib
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from nebula.config.job import JobConfig

log = logging.getLogger(__name__)

EXTRA = "trackers"
INSTALL_HINT = f"pip install 'nebula-rl[{EXTRA}]'"


class TrackerUnavailable(ImportError):
    """A tracker the job config asks for whose package is not installed."""


@runtime_checkable
class Tracker(Protocol):
    """One experiment tracker run: `log` a row of scalars at a step, `close` at the end."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def require(module: str, setting: str, package: str) -> Any:
    """Import `module` for the config setting `setting`, or raise TrackerUnavailable
    naming the setting and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackerUnavailable(
            f"`{setting}` is set in the job config but the {package!r} package is not "
            f"installed: {INSTALL_HINT} (or `pip install {package}`), or remove "
            f"`{setting}` ({e})") from e


def scalars(stage: str, values: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a metrics row: `{stage}/{key}` for each int/float value
    (not bools)."""
    return {f"{stage}/{k}": v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (a model_dump) as {"a.b.0.c": value}: dicts and lists of dicts are
    opened, lists of scalars kept whole (JSON text), empty containers as "{}" / "[]"."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple))
                                                 for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    elif isinstance(tree, (Mapping, list, tuple)):
        out[prefix] = json.dumps(tree, default=str)
    else:
        out[prefix] = tree
    return out


_SECRET_KEY = re.compile(r"password|passwd|secret|token$|api_key|credential", re.I)
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^/\s:@]*:)[^/\s@]+@")


def redact(key: str, value: Any) -> Any:
    """A config value fit to leave the machine: the password of a URL (`redis://:pw@h`)
    and the value of a secret-looking key masked."""
    if isinstance(value, str):
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value:
            return "***"
        return _URL_PASSWORD.sub(r"\1***@", value)
    return value


def job_params(cfg: JobConfig) -> dict[str, Any]:
    """The job config, flattened (tracker params / config), secrets masked."""
    return {k: redact(k, v) for k, v in flatten(cfg.model_dump(mode="json")).items()}


def _run_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:128] or "run"


# -- Weights & Biases -------------------------------------------------------------------


class WandbTracker:
    """A W&B run (offline by default: a local run dir under `dir`/wandb, uploaded with
    `wandb sync`). Its id is the run name, so a restarted learner resumes the same run.
    Every scalar is charted against the `step` metric (TensorBoard's step), which need not
    increase from row to row."""

    def __init__(self, *, project: str, run_name: str, mode: str = "offline",
                 entity: str | None = None, dir: str | Path | None = None,
                 config: Mapping[str, Any] | None = None, group: str | None = None) -> None:
        wandb = require("wandb", "logging.wandb", "wandb")
        self._wandb = wandb
        run_dir = Path(dir or ".").absolute()
        run_dir.mkdir(parents=True, exist_ok=True)  # else wandb falls back to /tmp
        self.run = wandb.init(
            project=project, entity=entity, mode=mode, dir=str(run_dir),
            id=_run_id(run_name), name=run_name, group=group,
            config=dict(config or {}), resume="allow", reinit="create_new",
            # The learner's own log stays as it is (no stdout/stderr capture).
            settings=wandb.Settings(console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._closed = False

    @property
    def run_dir(self) -> Path:
        """The run's local dir (offline: .../wandb/offline-run-<time>-<id>)."""
        return Path(self.run.settings.sync_dir)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if metrics:
            self.run.log({**{k: float(v) for k, v in metrics.items()}, "step": int(step)})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.run.finish()
        if self._wandb.run is None:  # no other run in this process: stop wandb's service
            self._wandb.teardown()


# -- MLflow -----------------------------------------------------------------------------


_MLFLOW_BAD = re.compile(r"[^\w./ -]")


def mlflow_name(name: str) -> str:
    """`name` as a valid MLflow metric/param key: `@` -> `_at_`, other characters MLflow
    rejects -> `_`, no empty / leading / trailing path parts."""
    key = _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))
    parts = [p if p not in (".", "..") else p.replace(".", "_")
             for p in key.split("/") if p]
    key = "/".join(parts) or "_"
    if posixpath.normpath(key) != key:  # paranoia: MLflow's path check
        key = key.replace("/", "_")
    return key[:250]


def _is_file_store(uri: str) -> bool:
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)
    return scheme is None or scheme.group(1).lower() == "file"


class MlflowTracker:
    """An MLflow run in `experiment` (created if missing) at `tracking_uri`. A run whose
    `nebula.run` tag is `run_name` is resumed (a restarted learner), else one is created
    with that name; `params` are logged once (a resumed run keeps the ones it has).

    A local file store (`file:...` or a path) is enabled for MLflow >= 3.7, which refuses
    one unless MLFLOW_ALLOW_FILE_STORE is set: this sets it (when unset)."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str,
                 params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        require("mlflow", "logging.mlflow", "mlflow-skinny")
        if _is_file_store(tracking_uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric, self._Param = Metric, Param
        self.tracking_uri = tracking_uri
        self.client = client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            try:
                exp_id = client.create_experiment(experiment)
            except Exception:  # noqa: BLE001 - created meanwhile by another process
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        self.experiment_id = exp_id
        safe = run_name.replace("'", "")
        found = client.search_runs([exp_id], f"tags.`nebula.run` = '{safe}'", max_results=1)
        if found:
            run = found[0]
            client.update_run(run.info.run_id, status="RUNNING")
            have = set(run.data.params)
        else:
            run = client.create_run(exp_id, run_name=run_name,
                                    tags={"nebula.run": run_name, **dict(tags or {})})
            have = set()
        self.run_id: str = run.info.run_id
        todo = [Param(k, str(v)[:6000]) for k, v in
                {mlflow_name(k): v for k, v in (params or {}).items()}.items() if k not in have]
        for i in range(0, len(todo), 100):  # MLflow's most params per batch
            client.log_batch(self.run_id, params=todo[i:i + 100])
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        ts = int(time.time() * 1000)
        rows = [self._Metric(mlflow_name(k), float(v), ts, int(step))
                for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):  # MLflow's most metrics per batch
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.set_terminated(self.run_id, "FINISHED")


# -- from the job config ----------------------------------------------------------------


def check_trackers(cfg: JobConfig) -> None:
    """Raise TrackerUnavailable now if a tracker `cfg.logging` asks for is not installed
    (cheap: e.g. before starting a job's actors)."""
    lg = cfg.logging
    if lg.wandb is not None and lg.wandb.mode != "disabled":
        require("wandb", "logging.wandb", "wandb")
    if lg.mlflow is not None:
        require("mlflow", "logging.mlflow", "mlflow-skinny")


def open_trackers(cfg: JobConfig, run_name: str) -> list[Tracker]:
    """The trackers `cfg.logging` asks for, each with a run named `run_name` (the job id)
    carrying the flattened job config. W&B: dir default `cfg.output_dir`; MLflow: tracking
    URI default `file:<absolute output_dir>/mlruns`."""
    lg = cfg.logging
    if lg.wandb is None and lg.mlflow is None:
        return []
    check_trackers(cfg)
    params = job_params(cfg)
    out: list[Tracker] = []
    try:
        if lg.wandb is not None and lg.wandb.mode != "disabled":
            w = lg.wandb
            out.append(WandbTracker(project=w.project, entity=w.entity, mode=w.mode,
                                    dir=w.dir or cfg.output_dir, run_name=run_name,
                                    config=params, group=cfg.name))
        if lg.mlflow is not None:
            m = lg.mlflow
            uri = m.tracking_uri or (Path(cfg.output_dir).absolute() / "mlruns").as_uri()
            out.append(MlflowTracker(tracking_uri=uri, experiment=m.experiment,
                                     run_name=run_name, params=params,
                                     tags={"nebula.job_name": cfg.name}))
    except BaseException:
        close_trackers(out)
        raise
    return out


# -- fan-out (MetricsSink, eval rows) ---------------------------------------------------

_failures: dict[int, int] = {}


def log_to_trackers(trackers: Iterable[Tracker], step: int,
                    metrics: Mapping[str, float]) -> None:
    """`metrics` (already named: TensorBoard tags) at `step` to each tracker. A tracker
    that fails is logged (its first failure with the traceback, then every 100th) and
    skipped: trackers are views, training goes on."""
    if not metrics:
        return
    for t in trackers:
        try:
            t.log(step, metrics)
        except Exception:  # noqa: BLE001
            n = _failures[id(t)] = _failures.get(id(t), 0) + 1
            if n == 1 or n % 100 == 0:
                log.warning("%s.log failed (%d failure(s) so far)", type(t).__name__, n,
                            exc_info=n == 1)


def log_eval(trackers: Iterable[Tracker], step: int, scalars: Mapping[str, float]) -> None:
    """An eval row: `scalars` as nebula.evaluation.flat_scalars gives them (`eval/...`,
    the TensorBoard tags) at `step` = the policy version."""
    log_to_trackers(trackers, step, scalars)


def close_trackers(trackers: Iterable[Tracker]) -> None:
    for t in trackers:
        try:
            t.close()
        except Exception:  # noqa: BLE001
            log.warning("%s.close failed", type(t).__name__, exc_info=True)
        _failures.pop(id(t), None)
