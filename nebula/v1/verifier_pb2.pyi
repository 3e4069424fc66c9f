from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerifyItem(_message.Message):
    __slots__ = ("verifier", "response", "reference", "metadata_json", "id")
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    verifier: str
    response: str
    reference: str
    metadata_json: str
    id: str
    def __init__(self, verifier: _Optional[str] = ..., response: _Optional[str] = ..., reference: _Optional[str] = ..., metadata_json: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class VerifyBatchRequest(_message.Message):
    __slots__ = ("items", "item_timeout_s")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ITEM_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[VerifyItem]
    item_timeout_s: float
    def __init__(self, items: _Optional[_Iterable[_Union[VerifyItem, _Mapping]]] = ..., item_timeout_s: _Optional[float] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("id", "verifier", "status", "reward", "passed", "reason", "details_json", "verifier_version", "elapsed_s")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[VerifyResult.Status]
        STATUS_OK: _ClassVar[VerifyResult.Status]
        STATUS_ERROR: _ClassVar[VerifyResult.Status]
        STATUS_TIMEOUT: _ClassVar[VerifyResult.Status]
    STATUS_UNSPECIFIED: VerifyResult.Status
    STATUS_OK: VerifyResult.Status
    STATUS_ERROR: VerifyResult.Status
    STATUS_TIMEOUT: VerifyResult.Status
    ID_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    verifier: str
    status: VerifyResult.Status
    reward: float
    passed: bool
    reason: str
    details_json: str
    verifier_version: str
    elapsed_s: float
    def __init__(self, id: _Optional[str] = ..., verifier: _Optional[str] = ..., status: _Optional[_Union[VerifyResult.Status, str]] = ..., reward: _Optional[float] = ..., passed: _Optional[bool] = ..., reason: _Optional[str] = ..., details_json: _Optional[str] = ..., verifier_version: _Optional[str] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class VerifyBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VerifyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[VerifyResult, _Mapping]]] = ...) -> None: ...

class ListVerifiersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifierInfo(_message.Message):
    __slots__ = ("name", "version", "description", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    description: str
    source: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ListVerifiersResponse(_message.Message):
    __slots__ = ("verifiers",)
    VERIFIERS_FIELD_NUMBER: _ClassVar[int]
    verifiers: _containers.RepeatedCompositeFieldContainer[VerifierInfo]
    def __init__(self, verifiers: _Optional[_Iterable[_Union[VerifierInfo, _Mapping]]] = ...) -> None: ...
