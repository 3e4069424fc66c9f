"""bench/gpu_check.py (a): the learner's training steps, with plain torch (bf16 parameters,
or fp32 master weights under bf16 autocast; fused AdamW) or DeepSpeed when importable."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from gpu_check_model import build_model, log, sync


# -- (a) training ------------------------------------------------------------------------


class TorchTrainer:
    """Plain torch: bf16 parameters (or fp32 master weights under bf16 autocast) and fused
    AdamW."""

    name = "torch"

    def __init__(self, model: Any, lr: float, fp32_master: bool, fused: bool) -> None:
        import torch

        self.model = model
        self.fp32_master = fp32_master
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                                     fused=fused)

    def step(self, ids: Any) -> float:
        import torch

        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.fp32_master):
            loss = lm_loss(self.model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def weights(self) -> list[tuple[str, Any]]:
        return list(self.model.named_parameters())


class DeepSpeedTrainer:
    """DeepSpeed (bf16, ZeRO stage `zero_stage`, fp32 master weights in its optimizer) with
    torch's fused AdamW, as the learner configures it."""

    name = "deepspeed"

    def __init__(self, model: Any, lr: float, zero_stage: int, micro_batch: int) -> None:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "steps_per_print": 1 << 30,
            "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {
                "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                "torch_adam": True, "fused": True}},
        }
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                    config=config)
        self.model = self.engine.module

    def step(self, ids: Any) -> float:
        loss = lm_loss(self.engine, ids)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def weights(self) -> list[tuple[str, Any]]:
        return list(self.engine.module.named_parameters())


def lm_loss(model: Any, ids: Any) -> Any:
    """Next-token cross-entropy over the whole sequence (log-softmax in fp32)."""
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: pure torch
        return False
    return True


def setup_deepspeed_env(device_type: str) -> None:
    os.environ["DS_ACCELERATOR"] = device_type
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def make_trainer(args: argparse.Namespace, cfg: Any, device: Any, micro_batch: int) -> Any:
    import torch

    use_ds = args.backend == "deepspeed" or (args.backend == "auto" and deepspeed_available())
    if use_ds:
        setup_deepspeed_env(device.type)
        import deepspeed

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        model = build_model(cfg, device, torch.float32, seed=0)
        return DeepSpeedTrainer(model, args.lr, args.zero_stage, micro_batch)
    dtype = torch.float32 if args.fp32_master else torch.bfloat16
    model = build_model(cfg, device, dtype, seed=0)
    return TorchTrainer(model, args.lr, args.fp32_master, fused=True)


def train(args: argparse.Namespace, cfg: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """Train warm-up + timed steps, halving the micro-batch on CUDA OOM. Returns the trainer
    and the numbers."""
    import torch

    mb = args.micro_batch
    while True:
        trainer = None
        try:
            trainer = make_trainer(args, cfg, device, mb)
            trainer.model.train()
            if args.compile:
                trainer.model.compile()
            gen = torch.Generator(device=device).manual_seed(0)

            def batch() -> Any:
                return torch.randint(0, cfg.vocab_size, (mb, args.seq), device=device,
                                     generator=gen)

            for _ in range(args.warmup):
                trainer.step(batch())
            sync(device)
            losses = []
            t0 = time.perf_counter()
            for _ in range(args.steps):
                losses.append(trainer.step(batch()))
            sync(device)
            dt = time.perf_counter() - t0
            loss = float(torch.stack(losses).float().mean())
            return trainer, {"micro_batch": mb, "step_s": dt / args.steps, "loss": loss,
                             "tokens_per_s": mb * args.seq * args.steps / dt}
        except torch.cuda.OutOfMemoryError:
            if mb == 1:
                raise
            log(f"out of GPU memory at micro-batch {mb}: retrying with {mb // 2}")
        # Out of the except block: its traceback no longer holds the failed step's tensors.
        del trainer
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        mb //= 2
