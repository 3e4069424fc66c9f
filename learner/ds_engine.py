"""DeepSpeed training engine of the learner: SFT and GRPO optimizer steps on a Hugging Face
causal LM; weights, checkpoints and exports come from `learner.ds_weights`.

One `DSLearnerEngine` is one data-parallel rank. Run as a single process it sets up the
distributed environment itself (RANK=0, WORLD_SIZE=1, a free MASTER_PORT, gloo on CPU, nccl
on CUDA); launched by `deepspeed`/`torchrun`, it uses the environment it is given.

One `step` (an algorithm's loss, `nebula.algo`) call is exactly one optimizer step over the whole batch it is
given, split into micro-batches whose gradients accumulate (`learner.packing`: `micro_batch`
sequences each, or by `max_tokens_per_micro_batch` tokens, packed into one row each with
`packing`). The losses are normalised by the token / sequence count of the whole batch, so the
micro-batching does not change the gradient. Log-probs are computed chunk by chunk
(`learner.logprobs`, `logits_chunk` positions of full-vocabulary logits at a time), and with
`activation_checkpointing` every decoder layer is recomputed in the backward pass.

torch, deepspeed and transformers are imported lazily (importing this module is cheap).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from learner.dist_env import choose_device, setup_distributed_env
from learner.ds_scoring import EngineScoring
from learner.ds_weights import EngineWeights

if TYPE_CHECKING:  # pragma: no cover
    from learner.batch import Batch
    from learner.logprobs import TokenLogProbs
    from learner.packing import MicroBatch
    from nebula.algo.base import Algorithm
    from nebula.config.job import LearnerConfig
    from nebula.v1.trajectory_pb2 import TrajectoryGroup

log = logging.getLogger(__name__)

LossFn = Callable[[int, "MicroBatch", "TokenLogProbs"], tuple[Any, dict[str, float]]]


class DSLearnerEngine(EngineWeights, EngineScoring):
    """A Hugging Face causal LM trained with DeepSpeed (ZeRO stage from the config).

    Args:
        model_path: Hugging Face checkpoint dir (config, weights, tokenizer).
        cfg: learner config (zero_stage, lr, micro-batching, packing, activation
            checkpointing, logits chunk, clip range, loss_norm, is_cap, kl, grad_clip,
            weight_decay, device, seed).
        dtype: float32 / bfloat16 / float16 (bf16/fp16 keep fp32 master weights, gradients and
            Adam states in DeepSpeed).
        temperature: sampling temperature of the rollouts; log-probs are those of
            softmax(logits / temperature), matching the behaviour policy.
        reference: keep a frozen copy of the initial model for the KL penalty (also implied by
            cfg.kl.coef > 0).
        optimizer: a torch optimizer, or a callable params -> optimizer, replacing the default
            AdamW (torch's, configured from cfg).
        recompute_old_logprobs: compute the pre-step log-probs in a separate no-grad pass
            (True), or take them from the training forward, detached (False, the default:
            grpo_step takes one optimizer step per batch, so every micro-batch's forward runs
            on the pre-step weights and the two are identical; tested. It saves a forward,
            ~20% of a real-model step).
        version: policy version of the initial weights.
        ds_config: entries merged over the generated DeepSpeed config.
        mlp_tile_tokens: with cfg.activation_checkpointing, the MLP of a recomputed layer runs
            in checkpointed tiles of this many tokens (`learner.ds_setup.tile_mlps`: a
            recomputed layer then holds ~1/3 of its activations, for one more MLP forward per
            layer); None: whole micro-batches.
    """

    def __init__(self, model_path: str, cfg: LearnerConfig, dtype: str = "float32",
                 temperature: float = 1.0, reference: bool = False, *,
                 optimizer: Any | Callable[[Any], Any] | None = None,
                 recompute_old_logprobs: bool = False, version: int = 0,
                 ds_config: dict[str, Any] | None = None,
                 mlp_tile_tokens: int | None = None) -> None:
        t0 = time.perf_counter()
        import torch

        from learner.ds_setup import ds_config as make_ds_config
        from learner.ds_setup import load_hf_model, prepare_trained_model

        self.model_path = str(model_path)
        self.cfg = cfg
        self.dtype = dtype
        self.temperature = float(temperature) if temperature and temperature > 0 else 1.0
        self.recompute_old_logprobs = recompute_old_logprobs
        self.version = int(version)
        self._tokenizer: Any = None
        self.device_type = choose_device(cfg.device)
        backend = setup_distributed_env(self.device_type)

        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if os.environ.get("NEBULA_DS_VERBOSE") is None:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        accel = get_accelerator().device_name()
        if accel != self.device_type:
            raise RuntimeError(f"DeepSpeed already runs on accelerator {accel!r} in this process; "
                               f"cannot train on {self.device_type!r}")
        if self.device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()

        torch.manual_seed(cfg.seed)
        model = load_hf_model(self.model_path, dtype)
        prepare_trained_model(model, cfg, mlp_tile_tokens)
        mc = model.config
        pad = getattr(mc, "pad_token_id", None)
        if pad is None:
            eos = getattr(mc, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.pad_id = int(pad) if pad is not None else 0

        params = [p for p in model.parameters() if p.requires_grad]
        client_opt = None
        if callable(optimizer) and not hasattr(optimizer, "step"):
            client_opt = optimizer(params)
        elif optimizer is not None:
            client_opt = optimizer
        config = make_ds_config(cfg, dtype, default_optimizer=optimizer is None,
                                extra=ds_config)
        self.ds_config = config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=client_opt, config=config)
        self.zero_stage = int(config["zero_optimization"].get("stage", 0))
        if self.world_size == 1 and self.zero_stage == 0:
            # The all-reduce of one rank is the identity, but DeepSpeed's fallback first
            # flattens every gradient into one bucket: a transient copy of all gradients.
            self.engine.enable_backward_allreduce = False

        self.ref_model = None
        if reference or cfg.kl.coef > 0:
            ref = load_hf_model(self.model_path, dtype).to(self.device)
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self.ref_model = ref
        self.init_time_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ helpers

    @property
    def module(self) -> Any:
        """The wrapped Hugging Face model (parameters partitioned under ZeRO-3)."""
        return self.engine.module

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of `model_path` (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Learning rate of the following steps (e.g. for an SFT warm-up)."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    def micro_batches(self, batch: Batch, whole_groups: bool = False) -> list[MicroBatch]:
        """The micro-batches of one optimizer step on `batch` (from the config)."""
        from learner.packing import plan_micro_batches

        from learner.logprobs import SEGMENT_ATTENTION

        c = self.cfg
        # Shared prompts need the segment attention (transformers' masks cannot express them).
        share = c.share_prompts and getattr(self.module.config, "_attn_implementation",
                                            None) == SEGMENT_ATTENTION
        return plan_micro_batches(batch, c.micro_batch, c.max_tokens_per_micro_batch, c.packing,
                                  whole_groups, share_prompts=share)

    def _logprobs(self, model: Any, mb: MicroBatch, with_top: bool = False,
                  with_entropy: bool = False, temperature: float | None = None
                  ) -> TokenLogProbs:
        """Log-probs of softmax(logits / temperature); default the rollouts' temperature. Under
        `learner.autocast` the forward (and so the backward of its graph, and the recompute of
        checkpointed layers) runs its matmuls in that dtype over the fp32 weights."""
        import contextlib

        import torch

        from learner.logprobs import micro_batch_logprobs

        t = self.temperature if temperature is None else temperature
        cast = (torch.autocast(self.device_type, dtype=torch.bfloat16)
                if self.cfg.autocast == "bfloat16" else contextlib.nullcontext())
        with cast:
            return micro_batch_logprobs(model, mb, t, self.cfg.logits_chunk,
                                        with_top=with_top, with_entropy=with_entropy)

    def _no_grad_logprobs(self, model: Any, mbs: list[MicroBatch], with_entropy: bool = False,
                          temperature: float | None = None) -> list[TokenLogProbs]:
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [self._logprobs(model, mb, with_entropy=with_entropy,
                                       temperature=temperature) for mb in mbs]
        finally:
            model.train(was_training)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def _max_over_ranks(self, value: int) -> int:
        if self.world_size == 1:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def _gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (small Python objects: metrics)."""
        import torch

        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _manual_grad_norm(self) -> float:
        import torch

        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters()
                 if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _optimizer_step(self, mbs: list[MicroBatch], loss_fn: LossFn, with_top: bool = False,
                        with_entropy: bool = False, temperature: float | None = None
                        ) -> tuple[list[dict], float | None]:
        """Forward/backward over the micro-batches (gradients accumulate), then one step.
        `loss_fn` gets each micro-batch's learner log-probs (with the teacher top-k / the
        entropy when asked)."""
        eng = self.engine
        eng.train()
        k = len(mbs)
        metrics = []
        for i, mb in enumerate(mbs):
            eng.set_gradient_accumulation_boundary(i == k - 1)
            lp = self._logprobs(eng, mb, with_top, with_entropy, temperature)
            loss, m = loss_fn(i, mb, lp)
            eng.backward(loss, scale_wrt_gas=False)
            del lp, loss  # the graph of this micro-batch, before the next forward
            if m is not None:  # None: a rank's padding micro-batch (no tokens of its own)
                metrics.append(m)
        manual = (self._manual_grad_norm()
                  if self.zero_stage == 0 and self.dtype == "float32" else None)
        eng.step()
        norm = eng.get_global_grad_norm()
        if norm is None:
            norm = manual
        elif hasattr(norm, "item"):
            norm = float(norm.item())
        applied = eng.was_step_applied() if hasattr(eng, "was_step_applied") else True
        if applied:
            self.version += 1
        return metrics, (None if norm is None else float(norm))

    @staticmethod
    def _combine(parts: list[dict[str, float]]) -> dict[str, float]:
        """Weighted means of per-micro-batch metrics (sums for loss/tokens/sequences, maxima
        for `_max`): weighted by a micro-batch's `weight` where the loss gives one (e.g. its
        DPO pairs), else by its tokens."""
        out: dict[str, float] = {}
        w = [p.get("weight", p.get("tokens", 0.0)) for p in parts]
        total = sum(w)
        for key in parts[0]:
            if key == "weight":
                continue
            vals = [p[key] for p in parts]
            if key in ("loss", "tokens", "sequences"):
                out[key] = float(sum(vals))
            elif key.endswith("_max"):
                out[key] = float(max(vals))
            else:
                out[key] = float(sum(v * x for v, x in zip(vals, w)) / total) if total else 0.0
        return out

    @staticmethod
    def _layout_metrics(mbs: list[MicroBatch]) -> dict[str, float]:
        model_tok = sum(mb.model_tokens for mb in mbs)
        real = sum(mb.real_tokens for mb in mbs)
        return {"micro_batches": float(len(mbs)), "forward_tokens": float(model_tok),
                "pad_frac": 1.0 - real / model_tok if model_tok else 0.0}

    # ------------------------------------------------------------------ training

    def step(self, batch: Batch, algo: Algorithm, *, examples: int | None = None,
             filler: bool = False) -> dict[str, float]:
        """One optimizer step of `algo`'s loss on `batch` (`nebula.algo`: the loss gets one
        `LossInput` per micro-batch). Online (RL) algorithms train on the rollout policy's
        temperature, get the pre-step log-probs from the training forward (or a no-grad pass,
        `recompute_old_logprobs`), the frozen reference's when the algorithm has a KL penalty
        and cfg.kl.coef > 0, the teacher's top-k where the batch has it; offline ones (SFT,
        DPO) train on temperature 1. A batch with no trained token does no step
        (`step_applied` 0). Online steps also report the learner/engine agreement on the
        sampled tokens (`learner.mismatch`: logprob_diff_abs_mean, mismatch_kl_k3, and their
        `_fresh` variants over the tokens of the learner's current version), staleness, and
        the mean entropy of the tempered policy over the trained tokens.

        Collective with several ranks: every rank calls it with its share of the step
        (`learner.shard`); the losses are normalised by the step's total counts and the
        metrics are the whole step's. A rank with no share passes some batch of the stage
        with `filler` (it only keeps the collectives in step; its passes weigh zero)."""
        import torch

        from learner.mismatch import LogprobMismatch
        from nebula.algo.base import LossInput

        t0 = time.perf_counter()
        batch = batch.to(self.device)
        with_top = batch.teacher_top_ids.shape[-1] > 0
        if filler:
            n_tok = n_seq = n_ex = n_top = r_sum = rows = 0.0
        else:
            n_tok, n_seq = float(batch.num_tokens), float(batch.num_sequences)
            n_ex = float(examples if examples is not None
                         else int(batch.group_index.max()) + 1)
            n_top = float(((batch.mask > 0) & batch.has_top).sum()) if with_top else 0.0
            r_sum, rows = float(batch.rewards.sum()), float(batch.size)
        # The whole step's counts (every rank's share): each rank's loss is normalised by
        # them, so the ranks' gradients add up to the one-rank gradient of the whole batch.
        n_tok, n_seq, n_ex, n_top, r_sum, rows = self._sum_over_ranks(
            [n_tok, n_seq, n_ex, n_top, r_sum, rows])
        base = {"sequences": rows, "version": float(self.version)}
        if n_tok == 0:
            return {**base, "loss": 0.0, "tokens": 0.0, "step_applied": 0.0, "step_time_s": 0.0}
        mbs = self.micro_batches(batch, whole_groups=algo.whole_examples)
        # Every rank runs as many forward/backward passes (ZeRO-3 gathers parameters in
        # each forward, collectively): a rank with fewer pads with passes of zero weight.
        n_real = 0 if filler else len(mbs)
        mbs = mbs + [mbs[-1]] * (self._max_over_ranks(len(mbs)) - len(mbs))
        cfg, online = self.cfg, algo.online
        temperature = self.temperature if online else 1.0
        old = (self._no_grad_logprobs(self.engine, mbs, with_entropy=True)
               if online and self.recompute_old_logprobs else None)
        use_kl = algo.kl_penalty and cfg.kl.coef > 0 and self.ref_model is not None
        ref = self._no_grad_logprobs(self.ref_model, mbs) if use_kl else None
        t_fwd = time.perf_counter() - t0
        version_before = self.version
        mismatch = LogprobMismatch() if online else None
        scale = float(self.world_size)  # DeepSpeed averages the ranks' gradients

        def loss_fn(i: int, mb: MicroBatch, out: TokenLogProbs) -> tuple[Any, dict | None]:
            b, lp = mb.batch, out.token
            if i >= n_real:  # padding pass: a zero gradient, through every parameter
                return lp.sum() * 0.0, None
            old_i = old[i].token if old is not None else lp.detach()
            entropy = old[i].entropy if old is not None else out.entropy
            loss, m = algo.loss(LossInput(
                batch=b, logprobs=lp, old_logprobs=old_i,
                ref_logprobs=ref[i].token if ref is not None else None, top_logprobs=out.top,
                entropy=entropy, num_tokens=n_tok, num_sequences=n_seq, num_top=n_top,
                num_examples=n_ex, learner=cfg))
            m.setdefault("tokens", float(b.num_tokens))
            if mismatch is not None:
                mismatch.add(old_i, b, version_before)
                with torch.no_grad():
                    sel = b.mask > 0
                    m["entropy"] = float(entropy[sel].mean()) if sel.any() else 0.0
                    sel = sel & (b.policy_versions >= 0)
                    lag = (version_before - b.policy_versions[sel]).float()
                    m["staleness_mean"] = float(lag.mean()) if lag.numel() else 0.0
                    m["staleness_max"] = float(lag.max()) if lag.numel() else 0.0
            return loss * scale if scale != 1.0 else loss, m

        lr = self.lr
        parts, norm = self._optimizer_step(mbs, loss_fn, with_top,
                                           with_entropy=online and old is None,
                                           temperature=temperature)
        if self.world_size > 1:  # the metrics of the whole step, identical on every rank
            parts = [p for rank_parts in self._gather(parts) for p in rank_parts]
            if mismatch is not None:
                mismatch = LogprobMismatch.merged(self._gather(mismatch))
        out = self._combine(parts)
        algo.summarise(out)
        dt = time.perf_counter() - t0
        out.update({**base, "grad_norm": norm if norm is not None else math.nan,
                    **self._layout_metrics(mbs), **(mismatch.metrics() if mismatch else {}),
                    "lr": lr, "step_time_s": dt, "tokens_per_s": n_tok / dt if dt > 0 else 0.0,
                    "version": float(self.version),
                    "step_applied": float(self.version > version_before)})
        if online:
            out.update(groups=n_ex, no_grad_fwd_time_s=t_fwd, reward_mean=r_sum / rows)
        else:
            out["examples"] = n_ex
        return out

    def sft_step(self, batch: Batch | Sequence[tuple[Sequence[int], Sequence[int]]]
                 ) -> dict[str, float]:
        """One SFT optimizer step on a `learner.batch.Batch` or (prompt_ids, target_ids)
        pairs: mean NLL of the target tokens."""
        from learner.batch import Batch, collate_sft
        from nebula.algo.sft import SFT, SFTStage

        if not isinstance(batch, Batch):
            batch = collate_sft(batch, self.pad_id)
        return self.step(batch, SFT(SFTStage()))

    def grpo_step(self, groups: Sequence[TrajectoryGroup]) -> dict[str, float]:
        """One GRPO optimizer step on the samples of `groups` (their advantages as recorded;
        with the top-k distillation term where they carry a teacher's top-k)."""
        from learner.batch import collate
        from nebula.algo.grpo import GRPO, GRPOStage

        if not groups:
            raise ValueError("grpo_step needs at least one group")
        return self.step(collate(groups, self.pad_id, self.device), GRPO(GRPOStage()),
                         examples=len(groups))

    # ------------------------------------------------------------------ lifetime

    def close(self, destroy_process_group: bool = False) -> None:
        """Free the engine (and optionally the process group, which otherwise stays up for
        the next engine of this process)."""
        import contextlib

        import torch

        eng = getattr(self, "engine", None)
        if eng is not None and hasattr(eng, "destroy"):
            with contextlib.suppress(Exception):
                eng.destroy()
        self.engine = None
        self.optimizer = None
        self.ref_model = None
        gc.collect()
        if destroy_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> DSLearnerEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
