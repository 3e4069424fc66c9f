"""What an algorithm is: the stage config it reads, what the rollout side computes for each
group (advantages, which teacher scores it), the loss the learner minimises on one typed
micro-batch, and (offline stages) the examples it trains on.

A stage type is one `Algorithm` subclass in one file, registered in `nebula.algo` (built-in)
or through the entry-point group `nebula.algorithms` (plug-ins). The learner, the rollout
workers and the runner only talk to this interface; none of them names an algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from nebula.config.stage import StageConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from nebula.config.job import JobConfig, LearnerConfig


@dataclass
class LossInput:
    """One micro-batch as a loss sees it. Per-token tensors are [S, T] in `learner.batch`'s
    layout (column t predicts token t + 1; `batch.mask` marks the trained tokens); the
    normalisers count the whole optimizer batch, so micro-batch losses add up to its loss."""

    batch: Any                               # learner.batch.Batch of the micro-batch's rows
    logprobs: torch.Tensor                   # learner log-probs of the tokens, with gradient
    old_logprobs: torch.Tensor               # the same before this optimizer step, detached
    ref_logprobs: torch.Tensor | None        # frozen reference policy's (KL), if asked for
    top_logprobs: torch.Tensor | None        # [S, T, k] learner log-probs at teacher top-k ids
    entropy: torch.Tensor | None             # [S, T] entropy of the tempered policy
    num_tokens: float                        # trained tokens of the optimizer batch
    num_sequences: float                     # sequences with a trained token
    num_top: float                           # trained positions with a teacher top-k
    num_examples: float                      # groups / offline examples of the batch
    learner: LearnerConfig


@dataclass
class Example:
    """One offline training example: its (prompt ids, target ids) sequences, which always go
    into the same micro-batch, in order (DPO: chosen, then rejected)."""

    sequences: list[tuple[list[int], list[int]]]
    ref_logprob_sums: list[float] | None = None   # per sequence, filled by `prepare`
    meta: dict[str, Any] = field(default_factory=dict)


class Algorithm:
    """Base: defaults fit an online RL stage with no teacher."""

    Config: ClassVar[type[StageConfig]]
    online: ClassVar[bool] = True   # rollout workers generate its data; False: a dataset
    whole_examples: ClassVar[bool] = False  # the loss needs an example's rows together
    measured: ClassVar[bool] = True  # held-out accuracy is measured before and after it

    def __init__(self, stage: StageConfig, job: JobConfig | None = None) -> None:
        self.stage, self.job = stage, job

    @classmethod
    def type_name(cls) -> str:
        return str(cls.Config.model_fields["type"].default)

    # -- config checks (JobConfig validation, and the runner's preflight) --------------------

    def check_config(self, where: str) -> None:
        """Cross-field errors of the job config (raise ValueError starting with `where`)."""

    def preflight(self, where: str, tokenizer: Any, context_len: int,
                  train_domains: Sequence[str]) -> None:
        """Errors found by reading the data, before any worker starts."""

    def row_fields(self, dataset: Any) -> tuple[str, ...]:
        """The fields besides the prompt this stage reads from every row of `dataset` (any of
        the job's datasets; () if it reads none). What a verifier needs is the dataset's own
        (nebula.inputs checks both, at submission and in the preflight)."""
        return ()

    # -- teachers ------------------------------------------------------------------------------

    def teachers(self) -> list[str]:
        """Teacher names the stage asks the teacher service for."""
        return []

    def teacher_for(self, domain: str) -> str:
        raise NotImplementedError(f"stage {self.type_name()} has no teacher")

    @property
    def teacher_top_k(self) -> int:
        return 0

    # -- rollout side ----------------------------------------------------------------------------

    @property
    def uses_verdicts(self) -> bool:
        """Whether the verifier's rewards shape the advantages: when they do, a sample the
        verifier could not score is left out of the loss and of its group's statistics."""
        return True

    def advantages(self, rewards: list[float], scored: list[bool], samples: Sequence[Any],
                   teacher: Sequence[Any] | None) -> list[tuple[float, list[float]]]:
        """(sequence advantage, per-token advantages or []) of each sample of one group.
        rewards: after truncation shaping; scored: False where the verifier gave no verdict
        (and `uses_verdicts`); samples: the engine's (completion_ids, logprobs, ...);
        teacher: each sample's teacher score when `teachers()` is not empty."""
        raise NotImplementedError

    # -- learner side ----------------------------------------------------------------------------

    kl_penalty: ClassVar[bool] = False  # the loss reads `ref_logprobs` when learner.kl.coef > 0

    def loss(self, inp: LossInput) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def step_metrics(self, groups: Sequence[Any]) -> dict[str, Any]:
        """Extra per-step metrics of an online stage from its trained groups."""
        return {}

    def summarise(self, metrics: dict[str, float]) -> None:
        """Derived metrics of a whole optimizer step (its micro-batches combined)."""

    # -- offline stages ----------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return int(getattr(self.stage, "batch_size"))

    @property
    def lr(self) -> float:
        return float(getattr(self.stage, "lr"))

    def examples(self, tokenizer: Any) -> list[Example]:
        """Training examples of an offline stage."""
        raise NotImplementedError

    def held_out(self, tokenizer: Any, sequence_logprobs: Any) -> dict[str, float]:
        """Held-out figures of an offline stage, measured before its first step and after its
        last (DPO: preference accuracy); `sequence_logprobs` as in `prepare`."""
        return {}

    def prepare(self, examples: list[Example], sequence_logprobs: Any) -> None:
        """Before the first step (e.g. DPO's reference log-probs). `sequence_logprobs(seqs)`
        returns the current policy's summed target log-prob of each (prompt, target)."""
