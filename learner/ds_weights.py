"""Weights of `DSLearnerEngine`: full state dicts (gathered under ZeRO-3), the safetensors blob
published to the rollout engines, DeepSpeed checkpoints and Hugging Face exports.

A mixin: it uses the engine's `engine` (DeepSpeed), `zero_stage`, `version`, `rank`,
`world_size` and `model_path`."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch

_VERSION_KEY = "nebula_version"
_CLIENT_KEY = "nebula_client_state"
# Files of a checkpoint dir that are weights (not copied by export_hf).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")
_OWN_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json"}


class EngineWeights:
    engine: Any
    zero_stage: int
    version: int
    rank: int
    world_size: int
    model_path: str

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
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

    def save_checkpoint(self, directory: str | os.PathLike, client_state: dict | None = None,
                        manifest: dict | None = None) -> str:
        """DeepSpeed checkpoint (model, optimizer, step, policy version, client_state) under
        `directory` (tag v<version>, plus DeepSpeed's `latest` file). Returns the tag path.

        With `manifest` (JSON meta: the job fingerprint, stage, step), the dir gets a
        `manifest.json` of its files' checksums and that meta once every rank has written
        (`nebula.checkpoints.write_manifest`); a stale one is removed before the save, so a
        save that dies half-way leaves a dir without a manifest (an incomplete checkpoint).
        Collective under ZeRO-3 / several ranks, as DeepSpeed's save is."""
        directory = Path(directory)
        if manifest is not None and self.rank == 0:
            from nebula.checkpoints import MANIFEST

            (directory / MANIFEST).unlink(missing_ok=True)
        tag = f"v{self.version:08d}"
        state = {_VERSION_KEY: self.version, _CLIENT_KEY: dict(client_state or {})}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=state)
        if manifest is not None:
            if self.world_size > 1:  # every rank's shards are on disk
                import torch

                torch.distributed.barrier()
            if self.rank == 0:
                from nebula.checkpoints import write_manifest

                write_manifest(directory, manifest)
            if self.world_size > 1:
                import torch

                torch.distributed.barrier()
        return str(directory / tag)

    def load_checkpoint(self, directory: str | os.PathLike, tag: str | None = None) -> dict:
        """Restore a `save_checkpoint` (latest tag unless given); returns its client_state.

        A dir with a manifest is checked first (every file there, sizes as recorded; checksums
        are `nebula.checkpoints.verify`'s job before this is called): a missing or truncated
        file, or a load DeepSpeed or torch fails on, raises CheckpointError naming the dir,
        not an error from inside DeepSpeed. After such a failure the engine's state is
        undefined: load another checkpoint, or use a fresh engine.

        Under ZeRO-3, load into a fresh engine (DeepSpeed wants an untouched model there)."""
        from nebula.checkpoints import MANIFEST, CheckpointError, verify

        if (Path(directory) / MANIFEST).exists():
            reason = verify(directory, checksums=False)
            if reason is not None:
                raise CheckpointError(f"checkpoint {directory} is unusable: {reason}")
        try:
            path, state = self.engine.load_checkpoint(str(directory), tag=tag,
                                                      load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        except Exception as e:  # noqa: BLE001 - torch.load / DeepSpeed on a corrupt file
            raise CheckpointError(f"checkpoint {directory} could not be loaded "
                                  f"({type(e).__name__}: {e})") from e
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
