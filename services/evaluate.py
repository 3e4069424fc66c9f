"""Eval jobs: `nebula eval CONFIG` (and `kind: eval` jobs of the REST service).

A model (a Hugging Face dir, a .gguf file, a training job's export, output or checkpoint
dir, or one learner checkpoint over its base model) is evaluated on one or more datasets:
every prompt is sampled n times at the configured temperature (and, when asked, once
greedily) by the rollout engines (RolloutWorker actors in Ray, vLLM or hf; each dataset's
prompts are split across `rollout.workers` of them), every completion is scored by the
verifier service (the embedded default starts one), and the per-prompt outcomes are turned
into metrics by `nebula.evaluation`: pass@k (unbiased estimator), mean@n, greedy accuracy,
mean completion length and truncation rate, for all prompts, per dataset and per domain.

Output (OUTPUT_DIR): `eval_results.json` (settings, metrics, per-prompt outcomes),
`eval_results.md` (the metrics as a Markdown table) and TensorBoard scalars under
`tensorboard/` (eval/METRIC, eval/dataset/NAME/METRIC, eval/domain/NAME/METRIC).

Bad input is refused before any engine starts, naming the file and field: an unreadable or
missing dataset file, a row without the prompt or reference field or without the metadata
field its verifier needs, a prompt that leaves no room for `sampling.max_tokens`, k larger
than sampling.n (a config error), a model path with no checkpoint; a verifier the service
does not run is refused once the service is up, still before any generation.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nebula.evaluation import (EvalJobConfig, evaluation_metrics, flat_scalars,
                               results_markdown)

ProgressFn = Callable[[dict[str, Any]], None]
STAGE = "eval0"  # the stage name progress reports carry (job records show stage/step)

class EvalInputError(ValueError):
    """Bad input of an eval job, found before any generation; the message names the file
    and the field."""


# -- the model ---------------------------------------------------------------------------


def _is_learner_checkpoint(p: Path) -> bool:
    return p.is_dir() and ((p / "manifest.json").is_file() or (p / "latest").is_file())


def resolve_model(cfg: EvalJobConfig, log: Callable[[str], None] = print) -> str:
    """A Hugging Face dir to evaluate, from `model.path` (see EvalJobConfig.model)."""
    m = cfg.model
    if m.path.lower().endswith(".gguf"):
        from nebula.model_import import ensure_hf_model

        if not Path(m.path).is_file():
            raise EvalInputError(f"model.path: GGUF file not found: {m.path}")
        return ensure_hf_model(m.path, m.import_dir, m.dtype)
    if m.toy is not None:
        from nebula.toy_model import ensure_toy_model

        return str(ensure_toy_model(m))
    p = Path(m.path)
    if (p / "config.json").is_file():
        return str(p)
    for sub in ("export", "checkpoints/export"):  # a checkpoint dir, a job's output dir
        if (p / sub / "config.json").is_file():
            log(f"model: {p / sub} (the export of {p})")
            return str(p / sub)
    if _is_learner_checkpoint(p):
        if not cfg.base_model:
            raise EvalInputError(
                f"model.path: {p} is a learner checkpoint (DeepSpeed state): set base_model "
                "to its job's model dir (config and tokenizer), or evaluate the job's export "
                "(OUTPUT_DIR/checkpoints/export)")
        return checkpoint_to_hf(p, cfg.base_model, Path(cfg.output_dir) / "model", log)
    raise EvalInputError(f"model.path: no Hugging Face checkpoint (config.json) at {p}, nor "
                         "a job's export under it")


def checkpoint_to_hf(ckpt: Path, base: str, out: Path,
                     log: Callable[[str], None] = print) -> str:
    """Write the weights of a learner checkpoint (its `latest` tag, else its newest) over
    the base model's config and tokenizer, as a Hugging Face dir at `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    basep = Path(base)
    if not (basep / "config.json").is_file():
        raise EvalInputError(f"base_model: no Hugging Face checkpoint (config.json) at {base}")
    tag_file = ckpt / "latest"
    tags = sorted(d.name for d in ckpt.iterdir() if d.is_dir())
    tag = tag_file.read_text().strip() if tag_file.is_file() else (tags[-1] if tags else "")
    states = ckpt / tag / "mp_rank_00_model_states.pt"
    if not tag or not states.is_file():
        raise EvalInputError(f"model.path: {ckpt} has no DeepSpeed model states "
                             f"({states.relative_to(ckpt) if tag else 'no tag dir'})")
    t0 = time.monotonic()
    cfgj = AutoConfig.from_pretrained(base)
    model = AutoModelForCausalLM.from_config(cfgj, dtype=torch.float32)
    try:
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    except Exception as e:  # noqa: BLE001 - named, not DeepSpeed's own traceback
        raise EvalInputError(f"model.path: cannot read {states}: {type(e).__name__}: {e}") from e
    own = model.state_dict()
    full = {k: v for k, v in module.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(full) < len([k for k in own if not k.endswith("lm_head.weight")]):
        # ZeRO-3 keeps partitioned placeholders in the module states: gather the fp32 ones.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight")
                                          and getattr(cfgj, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise EvalInputError(f"base_model: {base} does not fit the checkpoint {ckpt} "
                             f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})")
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    for f in basep.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and not (out / f.name).exists() and not f.name.endswith(
                (".safetensors", ".bin", ".pt", ".gguf")) and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    log(f"model: learner checkpoint {ckpt} ({tag}) over {base} -> {out} "
        f"({time.monotonic() - t0:.1f}s)")
    return str(out)


# -- the worker-side job config ----------------------------------------------------------


def dataset_names(cfg: EvalJobConfig) -> list[str]:
    """Each dataset's name in the breakdown: its file stem (#2, #3 ... on a clash)."""
    names: list[str] = []
    for d in cfg.datasets:
        base = Path(d.path).stem or "dataset"
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def worker_job_config(cfg: EvalJobConfig, model_path: str) -> Any:
    """The JobConfig RolloutWorkers are built from: the model, the eval sets as its prompts,
    the engine and sampling settings, the seed (worker i's engine: seed + 1000 i)."""
    from nebula.config.job import JobConfig

    r, s = cfg.rollout, cfg.sampling
    return JobConfig.model_validate({
        "name": cfg.name, "output_dir": cfg.output_dir,
        "model": {**cfg.model.model_dump(), "path": model_path, "toy": None, "import_dir": None},
        "datasets": {"train": [d.model_dump() for d in cfg.datasets]},
        "stages": [{"type": "sft", "steps": 1}],  # unused: a JobConfig has one at least
        "rollout": {"engine": r.engine, "workers": r.workers, "dtype": r.dtype,
                    "kv_cache_gb": r.kv_cache_gb, "num_cpus": r.num_cpus,
                    "num_gpus": r.num_gpus, "environment": r.environment.model_dump(),
                    "samples_per_prompt": max(2, s.n), "temperature": s.temperature,
                    "top_p": s.top_p, "max_tokens": s.max_tokens, "stop": list(s.stop)},
        # Nothing is published to an eval's engines: no NCCL weight transfer set up in them.
        "learner": {"weight_sync": "object_store"},
        "cluster": cfg.cluster.model_dump(), "seed": s.seed})


# -- TensorBoard -------------------------------------------------------------------------


_WRITERS: dict[str, Any] = {}  # one event file per TensorBoard dir and process


def write_scalars(tb_dir: Path | str, scalars: dict[str, float], step: int) -> None:
    """Scalars into this process's eval event file under `tb_dir` (beside the learner's),
    flushed at once."""
    from torch.utils.tensorboard import SummaryWriter

    key = str(Path(tb_dir).resolve())
    w = _WRITERS.get(key)
    if w is None:
        w = _WRITERS[key] = SummaryWriter(key, filename_suffix=".eval")
    for tag, v in scalars.items():
        w.add_scalar(tag, v, step)
    w.flush()


# -- the run -----------------------------------------------------------------------------


class EvalRunner:
    """Runs one eval job; `summary` (like JobRunner's) carries the eval row as it is known,
    so the REST driver's reporter records it."""

    def __init__(self, cfg: EvalJobConfig, job_id: str | None = None,
                 progress: ProgressFn | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.job_id = job_id or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        self.progress = progress
        self.log = log
        self.out = Path(cfg.output_dir)
        self.names = dataset_names(cfg)
        self.summary: dict[str, Any] = {"job_id": self.job_id, "kind": "eval", "stages": [],
                                        "evals": []}
        self.model_path: str | None = None

    # -- checks before anything starts --

    def preflight(self) -> list[int]:
        """Every error of the input before an engine starts (EvalInputError naming the file
        and field); returns each dataset's number of prompts."""
        from nebula.prompts import rows_read_once

        with rows_read_once():  # the field checks and the tokenizing parse each file once
            return self._preflight()

    def _preflight(self) -> list[int]:
        from transformers import AutoTokenizer

        from nebula.prompts import DatasetError, context_len, load_prompt_rows

        cfg = self.cfg
        self.model_path = resolve_model(cfg, self.log)
        model = cfg.model.model_copy(update={"path": self.model_path, "toy": None})
        try:
            ctx = context_len(model)
        except DatasetError as e:
            raise EvalInputError(str(e)) from None
        budget = ctx - cfg.sampling.max_tokens
        if budget <= 0:
            raise EvalInputError(f"sampling.max_tokens: {cfg.sampling.max_tokens} completion "
                                 f"tokens leave no room for a prompt in the model's {ctx}-token "
                                 "context (model.max_model_len)")
        from nebula.inputs import InputError, check_inputs

        try:  # files, parsing, the fields each dataset's verifier reads
            check_inputs(cfg)
        except InputError as e:
            raise EvalInputError(str(e)) from None
        tok = AutoTokenizer.from_pretrained(self.model_path)
        sizes = []
        for i, d in enumerate(cfg.datasets):
            try:
                rows = load_prompt_rows(d, tok, budget)
            except DatasetError as e:
                raise EvalInputError(f"datasets.{i}: {e}") from None
            sizes.append(len(rows))
        return sizes

    def _check_verifiers(self, address: str) -> None:
        from nebula.clients.verifier import VerifierClient
        from nebula.prompts import read_rows

        with VerifierClient(address) as client:
            known = {v["name"] for v in client.list_verifiers()}
        for i, d in enumerate(self.cfg.datasets):
            names = {d.verifier}
            if d.verifier_field:
                names |= {str(r[d.verifier_field]) for r in read_rows(d)
                          if r.get(d.verifier_field)}
            unknown = sorted(names - known)
            if unknown:
                field = f"datasets.{i}.{'verifier_field' if d.verifier_field else 'verifier'}"
                raise EvalInputError(f"{field}: {d.path}: verifier(s) {', '.join(unknown)} not "
                                     f"run by the verifier service at {address} (it runs "
                                     f"{', '.join(sorted(known))})")

    # -- running --

    def run(self) -> dict[str, Any]:
        from services.embedded import embedded_stack

        t_job = time.monotonic()
        sizes = self.preflight()
        assert self.model_path is not None
        self.out.mkdir(parents=True, exist_ok=True)
        job = worker_job_config(self.cfg, self.model_path)
        s = self.cfg.sampling
        self.log(f"eval {self.job_id}: {self.model_path} on "
                 + ", ".join(f"{n} ({k} prompts)" for n, k in zip(self.names, sizes))
                 + f"; n={s.n} at T={s.temperature}, top_p={s.top_p}, k={self.cfg.k}"
                 + (", greedy" if self.cfg.greedy else "")
                 + f"; {self.cfg.rollout.workers} {self.cfg.rollout.engine} worker(s)")
        with embedded_stack(job, self.out / "services") as stack:
            self._check_verifiers(stack["verifier_address"])
            sampled, greedy, timing = self._generate(job, stack)
        return self._report(sampled, greedy, timing, time.monotonic() - t_job)

    def _report_progress(self, done: int, total: int) -> None:
        if self.progress:
            try:
                self.progress({"stage": STAGE, "step": done, "total": total})
            except Exception:  # noqa: BLE001 - progress is best effort
                pass

    def _generate(self, job: Any, stack: dict[str, Any]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
        import ray

        from rollout.weight_store import WeightStore
        from rollout.worker import RolloutWorker

        cfg, rc, s = self.cfg, self.cfg.rollout, self.cfg.sampling
        t0 = time.monotonic()
        store = ray.remote(WeightStore).options(num_cpus=0).remote()  # nothing published
        jd = job.model_dump(by_alias=True)
        # vLLM's engine process schedules requests as they arrive (timing decides the
        # batches, so the random draws); in-process, one generate call's requests are all
        # queued before the first step.
        env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}} \
            if rc.engine == "vllm" and rc.deterministic else None
        workers = [ray.remote(RolloutWorker).options(
            num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, name=f"{self.job_id}-eval-{i}",
            runtime_env=env).remote(
                jd, self.job_id, i, stack["redis_url"], stack["verifier_address"], store)
            for i in range(rc.workers)]
        try:
            ray.get([w.pid.remote() for w in workers])  # engines up
            t1 = time.monotonic()
            self.log(f"{len(workers)} engine(s) ready in {t1 - t0:.1f}s")
            # Every call is queued now, in one fixed order per worker (an actor runs its
            # calls in order): the same seed gives the same samples.
            W = len(workers)
            calls: list[tuple[int, bool, Any]] = []
            for di, d in enumerate(cfg.datasets):
                dd = d.model_dump()
                for wi, w in enumerate(workers):
                    shard = (wi, W)
                    if cfg.greedy:
                        calls.append((di, True, w.evaluate.remote(
                            dd, 0.0, 10**9, 1, 1.0, shard, s.max_tokens)))
                    calls.append((di, False, w.evaluate.remote(
                        dd, s.temperature, 10**9, s.n, s.top_p, shard, s.max_tokens)))
            sampled: list[dict[str, Any]] = []
            greedy: list[dict[str, Any]] = []
            done = 0
            self._report_progress(0, len(cfg.datasets))
            for di in range(len(cfg.datasets)):
                for _, is_greedy, ref in [c for c in calls if c[0] == di]:
                    res = ray.get(ref)
                    for p in res["details"]:
                        (greedy if is_greedy else sampled).append(
                            {**p, "dataset": self.names[di]})
                done += 1
                self._report_progress(done, len(cfg.datasets))
                self.log(f"dataset {self.names[di]} done ({time.monotonic() - t1:.1f}s)")
            t2 = time.monotonic()
        finally:
            for a in [*workers, store]:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
        order = {n: i for i, n in enumerate(self.names)}
        key = lambda p: (order[p["dataset"]], p["index"])  # noqa: E731
        return sorted(sampled, key=key), sorted(greedy, key=key), {
            "engine_start_s": t1 - t0, "generate_score_s": t2 - t1}

    def _report(self, sampled: list[dict[str, Any]], greedy: list[dict[str, Any]],
                timing: dict[str, float], wall_s: float) -> dict[str, Any]:
        cfg, s = self.cfg, self.cfg.sampling
        metrics = evaluation_metrics(sampled, greedy if cfg.greedy else None, cfg.k)
        allm = metrics["all"]
        n = s.n
        row = {"when": f"eval of {self.model_path}", "version": 0,
               **({"greedy": allm["greedy"]} if cfg.greedy else {}),
               "sampled": allm.get(f"mean@{n}"),
               **{k: v for k, v in allm.items() if k not in ("greedy",)},
               "greedy_by_domain": {d: m.get("greedy") for d, m in metrics["by_domain"].items()}
               if cfg.greedy else {},
               "sampled_by_domain": {d: m.get(f"mean@{n}")
                                     for d, m in metrics["by_domain"].items()},
               "by_dataset": metrics["by_dataset"], "by_domain": metrics["by_domain"],
               "eval_s": timing["generate_score_s"]}
        self.summary["evals"].append(row)
        title = f"{cfg.name}: {self.model_path}"
        md = results_markdown(metrics, cfg.k, n, cfg.greedy, title=title)
        md += (f"\n{len(sampled)} prompts x {n} samples at temperature {s.temperature}, "
               f"top_p {s.top_p}, max_tokens {s.max_tokens}, seed {s.seed}"
               + ("; plus one greedy completion each" if cfg.greedy else "")
               + f"; {cfg.rollout.workers} {cfg.rollout.engine} worker(s); pass@k: unbiased "
               "estimator (Chen et al. 2021); mean@n: mean accuracy over the n samples.\n")
        results = {
            "job_id": self.job_id, "name": cfg.name, "model": self.model_path,
            "datasets": [{"name": nm, "path": d.path, "verifier": d.verifier}
                         for nm, d in zip(self.names, cfg.datasets)],
            "sampling": s.model_dump(), "k": cfg.k, "greedy": cfg.greedy,
            "engine": cfg.rollout.engine, "workers": cfg.rollout.workers,
            "metrics": metrics, "timing": {**timing, "wall_s": wall_s},
            "prompts": {"sampled": sampled, "greedy": greedy if cfg.greedy else []},
        }
        (self.out / "eval_results.json").write_text(json.dumps(results, indent=1))
        (self.out / "eval_results.md").write_text(md)
        try:
            write_scalars(self.out / "tensorboard", flat_scalars(metrics), 0)
        except Exception as e:  # noqa: BLE001 - the results files are written
            self.log(f"TensorBoard scalars not written: {e}")
        self.log(md)
        self.log(f"results: {self.out / 'eval_results.json'}, {self.out / 'eval_results.md'} "
                 f"({wall_s:.1f}s in all)")
        self.summary.update(results=str(self.out / "eval_results.json"), metrics=metrics,
                            wall_s=wall_s)
        return self.summary


def run_eval(cfg: EvalJobConfig | dict[str, Any] | str | Path, job_id: str | None = None,
             progress: ProgressFn | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """The Python entry of `nebula eval`: an EvalJobConfig, its dict, or a YAML/JSON file."""
    from nebula.config.load import load_file, load_model

    if isinstance(cfg, (str, Path)):
        cfg = load_file(EvalJobConfig, cfg)
    elif isinstance(cfg, dict):
        cfg = load_model(EvalJobConfig, cfg, source="eval config")
    return EvalRunner(cfg, job_id, progress, log).run()
