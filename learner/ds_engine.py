"""DeepSpeed training engine of the learner: SFT and GRPO optimizer steps on a Hugging Face
causal LM, weight publishing (safetensors blob), checkpoints and Hugging Face exports.

One `DSLearnerEngine` is one data-parallel rank. Run as a single process it sets up the
distributed environment itself (RANK=0, WORLD_SIZE=1, a free MASTER_PORT, gloo on CPU, nccl
on CUDA); launched by `deepspeed`/`torchrun`, it uses the environment it is given.

One `sft_step` / `grpo_step` call is exactly one optimizer step over the whole batch it is
given, split into micro-batches of `cfg.micro_batch` sequences whose gradients accumulate
(the losses are normalised by the token / sequence count of the whole batch, so the
micro-batching does not change the gradient).

torch, deepspeed and transformers are imported lazily (importing this module is cheap).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from learner.dist_env import choose_device, setup_distributed_env

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from learner.batch import Batch
    from nebula.config.job import LearnerConfig
    from nebula.v1.trajectory_pb2 import TrajectoryGroup

log = logging.getLogger(__name__)

_VERSION_KEY = "nebula_version"
_CLIENT_KEY = "nebula_client_state"
# Files of a checkpoint dir that are weights (not copied by export_hf).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")
_OWN_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json"}


def _torch_dtype(dtype: str) -> Any:
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}") from None


def _load_hf_model(model_path: str, dtype: str) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(model_path, **{key: _torch_dtype(dtype)})


class DSLearnerEngine:
    """A Hugging Face causal LM trained with DeepSpeed (ZeRO stage from the config).

    Args:
        model_path: Hugging Face checkpoint dir (config, weights, tokenizer).
        cfg: learner config (zero_stage, lr, micro_batch, clip range, loss_norm, is_cap, kl,
            grad_clip, weight_decay, device, seed).
        dtype: float32 / bfloat16 / float16 (bf16/fp16 keep fp32 master weights in DeepSpeed).
        temperature: sampling temperature of the rollouts; log-probs are those of
            softmax(logits / temperature), matching the behaviour policy.
        reference: keep a frozen copy of the initial model for the KL penalty (also implied by
            cfg.kl.coef > 0).
        optimizer: a torch optimizer, or a callable params -> optimizer, replacing the default
            AdamW (torch's, configured from cfg).
        recompute_old_logprobs: compute the pre-step log-probs in a separate no-grad pass
            (True), or take them from the training forward (False; identical with one
            optimizer step per batch, and one forward cheaper).
        version: policy version of the initial weights.
        ds_config: entries merged over the generated DeepSpeed config.
    """

    def __init__(self, model_path: str, cfg: LearnerConfig, dtype: str = "float32",
                 temperature: float = 1.0, reference: bool = False, *,
                 optimizer: Any | Callable[[Any], Any] | None = None,
                 recompute_old_logprobs: bool = True, version: int = 0,
                 ds_config: dict[str, Any] | None = None) -> None:
        t0 = time.perf_counter()
        import torch

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
        model = _load_hf_model(self.model_path, dtype)
        mc = model.config
        pad = getattr(mc, "pad_token_id", None)
        if pad is None:
            eos = getattr(mc, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.pad_id = int(pad) if pad is not None else 0

        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(cfg.grad_clip),
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
            "zero_optimization": {"stage": int(cfg.zero_stage)},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"},
        }
        params = [p for p in model.parameters() if p.requires_grad]
        client_opt = None
        if optimizer is None:
            config["optimizer"] = {"type": "AdamW", "params": {
                "lr": float(cfg.lr), "betas": [0.9, 0.999], "eps": 1e-8,
                "weight_decay": float(cfg.weight_decay), "torch_adam": True}}
        elif callable(optimizer) and not hasattr(optimizer, "step"):
            client_opt = optimizer(params)
        else:
            client_opt = optimizer
        if ds_config:
            config = _merge(config, ds_config)
        self.ds_config = config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=client_opt, config=config)
        self.zero_stage = int(config["zero_optimization"].get("stage", 0))

        self.ref_model = None
        if reference or cfg.kl.coef > 0:
            ref = _load_hf_model(self.model_path, dtype).to(self.device)
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

    def _logprobs(self, model: Any, mb: Batch, with_top: bool = False) -> Any:
        from learner.batch import token_logprobs

        return token_logprobs(model, mb, self.temperature, with_top=with_top)

    def _no_grad_logprobs(self, model: Any, mbs: list[Batch]) -> list[torch.Tensor]:
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [self._logprobs(model, mb) for mb in mbs]
        finally:
            model.train(was_training)

    def _manual_grad_norm(self) -> float:
        import torch

        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters()
                 if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _optimizer_step(self, mbs: list[Batch],
                        loss_fn: Callable[[int, Batch, Any], tuple[Any, dict]],
                        with_top: bool = False) -> tuple[list[dict], float | None]:
        """Forward/backward over the micro-batches (gradients accumulate), then one step.
        `loss_fn` gets the learner log-probs, or with `with_top` the pair (log-probs, log-probs
        at the teacher's top-k ids)."""
        eng = self.engine
        eng.train()
        k = len(mbs)
        metrics = []
        for i, mb in enumerate(mbs):
            eng.set_gradient_accumulation_boundary(i == k - 1)
            lp = self._logprobs(eng, mb, with_top)
            loss, m = loss_fn(i, mb, lp)
            eng.backward(loss, scale_wrt_gas=False)
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
        """Token-weighted means of per-micro-batch metrics (sums for loss/tokens/sequences)."""
        out: dict[str, float] = {}
        total = sum(p.get("tokens", 0.0) for p in parts)
        for key in parts[0]:
            vals = [p[key] for p in parts]
            if key in ("loss", "tokens", "sequences"):
                out[key] = float(sum(vals))
            elif key.endswith("_max"):
                out[key] = float(max(vals))
            else:
                out[key] = float(sum(v * p.get("tokens", 0.0) for v, p in zip(vals, parts))
                                 / total) if total > 0 else 0.0
        return out

    # ------------------------------------------------------------------ training

    def sft_step(self, batch: Batch | Sequence[tuple[Sequence[int], Sequence[int]]]
                 ) -> dict[str, float]:
        """One optimizer step of SFT: mean NLL of the target (completion) tokens.

        `batch` is a `learner.batch.Batch` (e.g. from `collate_sft`) or (prompt_ids,
        target_ids) pairs.
        """
        from learner.batch import Batch, collate_sft
        from learner.losses.sft import sft_loss

        t0 = time.perf_counter()
        if not isinstance(batch, Batch):
            batch = collate_sft(batch, self.pad_id)
        batch = batch.to(self.device)
        n_tok = batch.num_tokens
        if n_tok == 0:
            return {"loss": 0.0, "tokens": 0.0, "step_applied": 0.0,
                    "version": float(self.version), "step_time_s": 0.0}
        mbs = batch.micro_batches(self.cfg.micro_batch)

        def loss_fn(i: int, mb: Batch, lp: Any) -> tuple[Any, dict]:
            loss = sft_loss(lp, mb.mask, num_tokens=n_tok)
            return loss, {"loss": float(loss.detach()), "tokens": float(mb.num_tokens)}

        lr = self.lr
        parts, norm = self._optimizer_step(mbs, loss_fn)
        out = self._combine(parts)
        dt = time.perf_counter() - t0
        out.update({"grad_norm": norm if norm is not None else math.nan,
                    "ppl": math.exp(min(out["loss"], 50.0)), "sequences": float(batch.size),
                    "micro_batches": float(len(mbs)), "lr": lr, "step_time_s": dt,
                    "tokens_per_s": n_tok / dt if dt > 0 else 0.0,
                    "version": float(self.version), "step_applied": 1.0})
        return out

    def grpo_step(self, groups: Sequence[TrajectoryGroup]) -> dict[str, float]:
        """One optimizer step of the GRPO loss on the samples of `groups`.

        Old log-probs (before the step) come from a no-grad pass; reference log-probs from the
        frozen reference copy when cfg.kl.coef > 0. Tokens without behaviour log-probs get no
        IS correction. A batch with no trained token does no step (`step_applied` 0).
        """
        import torch

        from learner.batch import collate
        from learner.losses.distill import topk_distill_loss
        from learner.losses.grpo import grpo_loss

        t0 = time.perf_counter()
        if not groups:
            raise ValueError("grpo_step needs at least one group")
        batch = collate(groups, self.pad_id, self.device)
        n_tok, n_seq = batch.num_tokens, batch.num_sequences
        base = {"groups": float(len(groups)), "sequences": float(batch.size),
                "version": float(self.version)}
        if n_tok == 0:
            return {**base, "loss": 0.0, "tokens": 0.0, "step_applied": 0.0, "step_time_s": 0.0}
        mbs = batch.micro_batches(self.cfg.micro_batch)
        cfg = self.cfg
        old = self._no_grad_logprobs(self.engine, mbs) if self.recompute_old_logprobs else None
        use_kl = cfg.kl.coef > 0 and self.ref_model is not None
        ref = self._no_grad_logprobs(self.ref_model, mbs) if use_kl else None
        t_fwd = time.perf_counter() - t0

        with_top = batch.teacher_top_ids.shape[-1] > 0
        n_top = float(((batch.mask > 0) & batch.has_top).sum()) if with_top else 0.0

        def loss_fn(i: int, mb: Batch, out: Any) -> tuple[Any, dict]:
            lp, top = out if with_top else (out, None)
            old_i = old[i] if old is not None else lp.detach()
            beh = torch.where(mb.has_behaviour, mb.behaviour_logprobs, old_i)
            loss, m = grpo_loss(
                lp, old_i, beh, mb.advantages, mb.mask, cfg.clip_low, cfg.clip_high,
                cfg.loss_norm, cfg.is_cap, ref[i] if ref is not None else None,
                cfg.kl.coef if use_kl else 0.0, cfg.kl.estimator,
                num_tokens=n_tok, num_sequences=n_seq)
            m["sequences"] = float(mb.num_sequences)
            if top is not None:  # OPD with top-k: match the teacher's distribution as well
                d_loss, dm = topk_distill_loss(top, mb.teacher_top_logprobs,
                                               mb.mask * mb.has_top, num_tokens=n_top)
                loss = loss + d_loss
                m.update(dm, loss=m["loss"] + float(d_loss.detach()))
            with torch.no_grad():
                sel = (mb.mask > 0) & (mb.policy_versions >= 0)
                lag = (self.version - mb.policy_versions[sel]).float()
                m["staleness_mean"] = float(lag.mean()) if lag.numel() else 0.0
                m["staleness_max"] = float(lag.max()) if lag.numel() else 0.0
            return loss, m

        lr = self.lr
        version_before = self.version
        parts, norm = self._optimizer_step(mbs, loss_fn, with_top)
        out = self._combine(parts)
        dt = time.perf_counter() - t0
        out.update({**base, "grad_norm": norm if norm is not None else math.nan,
                    "micro_batches": float(len(mbs)), "lr": lr, "step_time_s": dt,
                    "no_grad_fwd_time_s": t_fwd, "tokens_per_s": n_tok / dt if dt > 0 else 0.0,
                    "reward_mean": float(batch.rewards.mean()),
                    "version": float(self.version),
                    "step_applied": float(self.version > version_before)})
        return out

    # ------------------------------------------------------------------ evaluation

    def logprobs(self, groups: Sequence[TrajectoryGroup]) -> list[list[float]]:
        """Current-policy log-prob of every completion token, one list per sample (groups in
        order, their samples in order). A sample with an empty prompt has no log-prob for
        its first completion token."""
        from learner.batch import collate

        batch = collate(groups, self.pad_id, self.device)
        out: list[list[float]] = []
        for mb in batch.micro_batches(self.cfg.micro_batch):
            lp = self._no_grad_logprobs(self.engine, [mb])[0].float().cpu()
            cm = mb.completion_mask.cpu() > 0
            for b in range(mb.size):
                out.append(lp[b][cm[b]].tolist())
        return out

    # ------------------------------------------------------------------ weights

    @contextlib.contextmanager
    def _gathered(self) -> Any:
        """Full parameters in the module (gathered from their partitions under ZeRO-3)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()),
                                                   modifier_rank=None):
                yield
        else:
            yield

    def full_state_dict(self, device: Any = "cpu") -> dict[str, torch.Tensor]:
        """Hugging Face-named full weights copied to `device` (model dtype); a tensor shared by
        several names (tied embeddings) is kept under its first name only, as `save_pretrained`
        does."""
        out: dict[str, Any] = {}
        seen: set[tuple] = set()
        with self._gathered():
            for name, t in self.engine.module.state_dict().items():
                key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                if t.numel() and key in seen:
                    continue
                seen.add(key)
                out[name] = t.detach().to(device, copy=True).contiguous()
        return out

    def state_dict_blob(self) -> bytes:
        """Full weights as a safetensors blob (metadata: format pt, policy version).
        Collective under ZeRO-3 (every rank calls it)."""
        from safetensors.torch import save

        return save(self.full_state_dict(), metadata={"format": "pt",
                                                      "version": str(self.version)})

    def save_checkpoint(self, directory: str | os.PathLike, client_state: dict | None = None
                        ) -> str:
        """DeepSpeed checkpoint (model, optimizer, step, policy version, client_state) under
        `directory` (tag v<version>, plus DeepSpeed's `latest` file). Returns the tag path."""
        tag = f"v{self.version:08d}"
        state = {_VERSION_KEY: self.version, _CLIENT_KEY: dict(client_state or {})}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=state)
        return str(Path(directory) / tag)

    def load_checkpoint(self, directory: str | os.PathLike, tag: str | None = None) -> dict:
        """Restore a `save_checkpoint` (latest tag unless given); returns its client_state.

        Under ZeRO-3, load into a fresh engine (DeepSpeed wants an untouched model there)."""
        path, state = self.engine.load_checkpoint(str(directory), tag=tag,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        state = state or {}
        self.version = int(state.get(_VERSION_KEY, self.version))
        return dict(state.get(_CLIENT_KEY, {}))

    def export_hf(self, directory: str | os.PathLike) -> str:
        """Write a Hugging Face checkpoint (safetensors weights, config, generation config and
        the tokenizer files of `model_path`), loadable by transformers and vLLM. Collective
        under ZeRO-3 (every rank calls it); rank 0 writes."""
        directory = Path(directory)
        state = self.full_state_dict()
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            self.engine.module.save_pretrained(str(directory), state_dict=state)
            src = Path(self.model_path)
            for f in src.iterdir():
                if (f.is_file() and f.name not in _OWN_FILES
                        and not f.name.endswith(_WEIGHT_SUFFIXES)
                        and not (directory / f.name).exists()):
                    shutil.copy2(f, directory / f.name)
        if self.world_size > 1:
            import torch

            torch.distributed.barrier()
        return str(directory)

    def close(self, destroy_process_group: bool = False) -> None:
        """Free the engine (and optionally the process group, which otherwise stays up for
        the next engine of this process)."""
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


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
