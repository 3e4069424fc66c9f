"""Process environment for DeepSpeed: accelerator, cached op builds, single-process
rendezvous. Light: imports torch/deepspeed only inside functions."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from nebula.service_process import free_port

DEFAULT_TORCH_EXTENSIONS_DIR = str(Path(__file__).resolve().parent.parent / ".cache"
                                   / "torch_extensions")


# glibc settings of the learner's process (its Ray actor's environment). Every block of
# >= 1 MiB (activations, logits chunks, gradient buckets) is its own mmap, handed back to the
# OS on free(); glibc's default threshold climbs to 32 MiB after the first large free and then
# keeps such blocks in the heap, where freed memory stays resident and a real-size learner's
# RSS grows far past what it holds. Two arenas: the learner's threads need no more.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_ARENA_MAX": "2"}


def choose_device(device: str) -> str:
    """"cpu" or "cuda" for a LearnerConfig.device of auto/cpu/cuda."""
    import torch

    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("learner.device is cuda but no CUDA device is available")
        return "cuda"
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_distributed_env(device_type: str) -> str:
    """Environment for DeepSpeed on `device_type`; returns the dist backend (gloo / nccl).

    Sets DS_ACCELERATOR, TORCH_EXTENSIONS_DIR (a cached path: DeepSpeed compiles its shm op
    there on first use) and, when not launched by a launcher, the single-process rendezvous
    variables (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT with a free port).
    """
    os.environ["DS_ACCELERATOR"] = "cuda" if device_type == "cuda" else "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_TORCH_EXTENSIONS_DIR)
    # torch builds ops with the first `ninja` on PATH. Ninja versions disagree on the format
    # of their build log and rebuild everything when they meet another's, so processes that
    # share TORCH_EXTENSIONS_DIR must use the same one: prefer the interpreter's own.
    bindir = os.path.dirname(sys.executable)
    venv_ninja = os.path.join(bindir, "ninja")
    if os.access(venv_ninja, os.X_OK) and shutil.which("ninja") != venv_ninja:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    Path(os.environ["TORCH_EXTENSIONS_DIR"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # One process: its store binds a port the kernel picks (0), so no other process can
        # take the port between choosing and binding it, as with a port picked in advance.
        single = os.environ["WORLD_SIZE"] == "1"
        os.environ["MASTER_PORT"] = "0" if single else str(free_port())
    return "nccl" if device_type == "cuda" else "gloo"


def prebuild_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory comm op into TORCH_EXTENSIONS_DIR now (set-up
    time), so the first job does not spend minutes on it."""
    setup_distributed_env("cpu")
    import deepspeed  # noqa: F401
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
