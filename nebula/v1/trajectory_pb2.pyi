from nebula.v1 import verifier_pb2 as _verifier_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sample(_message.Message):
    __slots__ = ("completion_ids", "behaviour_logprobs", "policy_versions", "loss_mask", "reward", "advantage", "token_advantages", "teacher_logprobs", "teacher", "teacher_version", "verify", "completion_text", "finish_reason", "teacher_top_k", "teacher_top_ids", "teacher_top_logprobs", "truncated", "turns", "tool_calls", "env_error", "reward_parts")
    class RewardPartsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    TEACHER_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    ENV_ERROR_FIELD_NUMBER: _ClassVar[int]
    REWARD_PARTS_FIELD_NUMBER: _ClassVar[int]
    completion_ids: _containers.RepeatedScalarFieldContainer[int]
    behaviour_logprobs: _containers.RepeatedScalarFieldContainer[float]
    policy_versions: _containers.RepeatedScalarFieldContainer[int]
    loss_mask: _containers.RepeatedScalarFieldContainer[int]
    reward: float
    advantage: float
    token_advantages: _containers.RepeatedScalarFieldContainer[float]
    teacher_logprobs: _containers.RepeatedScalarFieldContainer[float]
    teacher: str
    teacher_version: str
    verify: _verifier_pb2.VerifyResult
    completion_text: str
    finish_reason: str
    teacher_top_k: int
    teacher_top_ids: _containers.RepeatedScalarFieldContainer[int]
    teacher_top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    truncated: bool
    turns: int
    tool_calls: int
    env_error: str
    reward_parts: _containers.ScalarMap[str, float]
    def __init__(self, completion_ids: _Optional[_Iterable[int]] = ..., behaviour_logprobs: _Optional[_Iterable[float]] = ..., policy_versions: _Optional[_Iterable[int]] = ..., loss_mask: _Optional[_Iterable[int]] = ..., reward: _Optional[float] = ..., advantage: _Optional[float] = ..., token_advantages: _Optional[_Iterable[float]] = ..., teacher_logprobs: _Optional[_Iterable[float]] = ..., teacher: _Optional[str] = ..., teacher_version: _Optional[str] = ..., verify: _Optional[_Union[_verifier_pb2.VerifyResult, _Mapping]] = ..., completion_text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., teacher_top_k: _Optional[int] = ..., teacher_top_ids: _Optional[_Iterable[int]] = ..., teacher_top_logprobs: _Optional[_Iterable[float]] = ..., truncated: _Optional[bool] = ..., turns: _Optional[int] = ..., tool_calls: _Optional[int] = ..., env_error: _Optional[str] = ..., reward_parts: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrajectoryGroup(_message.Message):
    __slots__ = ("group_id", "job_id", "stage", "prompt_id", "domain", "prompt_ids", "prompt_text", "reference", "samples", "min_policy_version", "max_policy_version", "rollout_worker", "created_unix", "ticket", "step", "refills")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MIN_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_WORKER_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REFILLS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    job_id: str
    stage: str
    prompt_id: str
    domain: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_text: str
    reference: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    min_policy_version: int
    max_policy_version: int
    rollout_worker: str
    created_unix: float
    ticket: int
    step: int
    refills: int
    def __init__(self, group_id: _Optional[str] = ..., job_id: _Optional[str] = ..., stage: _Optional[str] = ..., prompt_id: _Optional[str] = ..., domain: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., prompt_text: _Optional[str] = ..., reference: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., min_policy_version: _Optional[int] = ..., max_policy_version: _Optional[int] = ..., rollout_worker: _Optional[str] = ..., created_unix: _Optional[float] = ..., ticket: _Optional[int] = ..., step: _Optional[int] = ..., refills: _Optional[int] = ...) -> None: ...
