import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from torpor.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterModelRequest(_message.Message):
    __slots__ = ("spec", "chat_template")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.ModelSpec
    chat_template: str
    def __init__(self, spec: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., chat_template: _Optional[str] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ...) -> None: ...

class UnregisterModelRequest(_message.Message):
    __slots__ = ("name", "delete_snapshots")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DELETE_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    delete_snapshots: bool
    def __init__(self, name: _Optional[str] = ..., delete_snapshots: _Optional[bool] = ...) -> None: ...

class UnregisterModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.Model]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.Model, _Mapping]]] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("model", "deadline", "priority", "lease_ttl")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    model: str
    deadline: _timestamp_pb2.Timestamp
    priority: int
    lease_ttl: _duration_pb2.Duration
    def __init__(self, model: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ..., lease_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AcquireEvent(_message.Message):
    __slots__ = ("queued", "evicting", "loading", "restoring", "ready")
    class Queued(_message.Message):
        __slots__ = ("position", "queue_depth")
        POSITION_FIELD_NUMBER: _ClassVar[int]
        QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
        position: int
        queue_depth: int
        def __init__(self, position: _Optional[int] = ..., queue_depth: _Optional[int] = ...) -> None: ...
    class Evicting(_message.Message):
        __slots__ = ("victims",)
        VICTIMS_FIELD_NUMBER: _ClassVar[int]
        victims: _containers.RepeatedCompositeFieldContainer[_common_pb2.Victim]
        def __init__(self, victims: _Optional[_Iterable[_Union[_common_pb2.Victim, _Mapping]]] = ...) -> None: ...
    class Ready(_message.Message):
        __slots__ = ("lease_id", "expires_at", "gpu", "worker_endpoint", "runtime_id")
        LEASE_ID_FIELD_NUMBER: _ClassVar[int]
        EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
        GPU_FIELD_NUMBER: _ClassVar[int]
        WORKER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
        RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
        lease_id: str
        expires_at: _timestamp_pb2.Timestamp
        gpu: int
        worker_endpoint: str
        runtime_id: str
        def __init__(self, lease_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu: _Optional[int] = ..., worker_endpoint: _Optional[str] = ..., runtime_id: _Optional[str] = ...) -> None: ...
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    EVICTING_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    RESTORING_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    queued: AcquireEvent.Queued
    evicting: AcquireEvent.Evicting
    loading: _common_pb2.TransferProgress
    restoring: _common_pb2.TransferProgress
    ready: AcquireEvent.Ready
    def __init__(self, queued: _Optional[_Union[AcquireEvent.Queued, _Mapping]] = ..., evicting: _Optional[_Union[AcquireEvent.Evicting, _Mapping]] = ..., loading: _Optional[_Union[_common_pb2.TransferProgress, _Mapping]] = ..., restoring: _Optional[_Union[_common_pb2.TransferProgress, _Mapping]] = ..., ready: _Optional[_Union[AcquireEvent.Ready, _Mapping]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("lease_id", "ttl")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("expires_at",)
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "lease_id", "prompt_text", "prompt_token_ids", "prompt_chat", "sampling", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    lease_id: str
    prompt_text: str
    prompt_token_ids: _common_pb2.TokenIds
    prompt_chat: _common_pb2.ChatPrompt
    sampling: _common_pb2.SamplingParams
    priority: int
    def __init__(self, model: _Optional[str] = ..., lease_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., prompt_chat: _Optional[_Union[_common_pb2.ChatPrompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("model", "tier", "wait")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: _common_pb2.Tier
    wait: bool
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., wait: _Optional[bool] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("state", "tier")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.RuntimeState
    tier: _common_pb2.Tier
    def __init__(self, state: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...
