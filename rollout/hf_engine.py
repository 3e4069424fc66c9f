"""transformers `generate` rollout engine: the fallback engine and the reference in tests.

Log-probs follow rollout/engine.py's contract: `log_softmax` of the processed scores (logits /
temperature, top-p applied; raw logits when greedy), gathered at the sampled token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rollout.engine import FinishReason, RolloutEngine, SampleOut, blob_to_state_dict

_DTYPES = {"float32", "bfloat16", "float16"}


class HFEngine(RolloutEngine):
    """Batched sampling with transformers; `seed` seeds a private RNG stream (the global torch
    RNG is left as it was)."""

    def __init__(self, model_path: str | Path, *, dtype: str = "float32", seed: int = 0,
                 device: str = "cpu", max_batch_rows: int = 512, **_: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=getattr(torch, dtype)).to(self.device).eval()
        self.eos_token_id: int = self.tokenizer.eos_token_id
        # Every id that ends a turn: the generation config's list (e.g. <|im_end|> and
        # <|endoftext|>) and the tokenizer's EOS, as vLLM stops on both.
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        gen_eos = list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        self.eos_ids: list[int] = sorted({int(i) for i in [*gen_eos, self.eos_token_id]
                                          if i is not None})
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else self.eos_token_id
        self.max_batch_rows = max_batch_rows
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._rng_state = torch.get_rng_state()
        self._version = 0

    # ------------------------------------------------------------------------------ generate

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[SampleOut]]:
        if not prompt_ids:
            return []
        per_call = max(1, self.max_batch_rows // max(1, n))
        groups: list[list[SampleOut]] = []
        for i in range(0, len(prompt_ids), per_call):
            groups.extend(self._generate_chunk(prompt_ids[i:i + per_call], n, temperature,
                                               top_p, max_tokens, tuple(stop)))
        return groups

    def _cut(self, ids: list[int], stop: tuple[str, ...]) -> tuple[list[int], FinishReason]:
        """The completion up to and including its first EOS or stop string."""
        for j, tok in enumerate(ids):
            if tok in self.eos_ids:
                return ids[:j + 1], "stop"
        if stop:
            text = ""
            for j in range(len(ids)):  # the shortest prefix whose text holds a stop string
                text = self.tokenizer.decode(ids[:j + 1], skip_special_tokens=True)
                if any(s in text for s in stop):
                    return ids[:j + 1], "stop"
        return ids, "length"

    def _generate_chunk(self, prompt_ids: list[list[int]], n: int, temperature: float,
                        top_p: float, max_tokens: int, stop: tuple[str, ...] = ()
                        ) -> list[list[SampleOut]]:
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for r, p in enumerate(prompt_ids):  # left padding
            if not p:
                raise ValueError("empty prompt")
            input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        greedy = temperature <= 0
        if greedy and n > 1:  # all n greedy samples are the same: compute one, copy it
            return [[SampleOut(list(s.completion_ids), list(s.logprobs), s.text, s.finish_reason)
                     for _ in range(n)] for (s,) in self._generate_chunk(
                         prompt_ids, 1, temperature, top_p, max_tokens, stop)]
        cfg = GenerationConfig(
            do_sample=not greedy, temperature=1.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(top_p), top_k=None if greedy else 0, min_p=0.0, typical_p=1.0,
            repetition_penalty=1.0, num_beams=1, num_return_sequences=n,
            max_new_tokens=max_tokens, min_new_tokens=0,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_token_id, bos_token_id=None,
            output_scores=True, return_dict_in_generate=True, use_cache=True,
            stop_strings=list(stop) or None,
        )
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.set_rng_state(self._rng_state)
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=mask.to(self.device), generation_config=cfg,
                                      tokenizer=self.tokenizer if stop else None)
            self._rng_state = torch.get_rng_state()
        new = out.sequences[:, width:].cpu()
        # scores: one [rows, vocab] per step, processed (temperature, top-p) -> sampling dist.
        steps = len(out.scores)
        token_lp = torch.stack([
            torch.log_softmax(out.scores[t].float(), dim=-1)
            .gather(-1, new[:, t:t + 1].to(out.scores[t].device)).squeeze(-1).cpu()
            for t in range(steps)
        ], dim=1) if steps else torch.zeros((new.shape[0], 0))

        groups: list[list[SampleOut]] = []
        for r0 in range(len(prompt_ids)):
            group = []
            for j in range(n):
                row = r0 * n + j  # generate repeats each prompt n times, consecutively
                ids, reason = self._cut(new[row, :steps].tolist(), stop)
                lps = token_lp[row, :len(ids)].tolist()
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(SampleOut(completion_ids=ids, logprobs=lps, text=text,
                                       finish_reason=reason))
            groups.append(group)
        return groups

    # ------------------------------------------------------------------------------- weights

    def load_weights(self, blob: bytes, version: int) -> None:
        """Validate the blob against the model (names, shapes; every parameter present, a tied
        alias counting as present), then copy it in. A bad blob leaves the weights untouched."""
        import torch

        tensors = blob_to_state_dict(blob)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers())
        unexpected = [k for k in tensors if k not in params and k not in buffers]
        if unexpected:
            raise KeyError(f"unexpected weights: {unexpected[:5]}")
        bad_shape = [k for k, t in tensors.items()
                     if tuple(t.shape) != tuple((params.get(k, buffers.get(k))).shape)]
        if bad_shape:
            raise ValueError(f"weights with wrong shapes: {bad_shape[:5]}")
        given = {params[k].data_ptr() for k in tensors if k in params}
        missing = [k for k, p in params.items() if p.data_ptr() not in given]
        if missing:
            raise KeyError(f"weights missing from the blob: {missing[:5]}")
        with torch.no_grad():
            self.model.load_state_dict(tensors, strict=False)
        self._version = int(version)

    def weights_report(self) -> list[dict[str, Any]]:
        """`probe_report` of each probe tensor the model holds (after `load_weights`, they
        must equal the blob's)."""
        from nebula.weight_check import PROBE_NAMES, probe_report

        params = dict(self.model.named_parameters())  # a tied lm_head is left out
        return [probe_report(name, params[name].data) for name in PROBE_NAMES if name in params]

    def state_dict_blob(self) -> bytes:
        """The engine's current weights as a blob (tests, debugging)."""
        from rollout.engine import state_dict_to_blob

        return state_dict_to_blob(self.model.state_dict())

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]

