import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from torpor.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvictMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVICT_MODE_UNSPECIFIED: _ClassVar[EvictMode]
    EVICT_MODE_DRAIN: _ClassVar[EvictMode]
    EVICT_MODE_ABORT: _ClassVar[EvictMode]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_CPU: _ClassVar[Backend]
    BACKEND_CUDA: _ClassVar[Backend]

class SnapshotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_STATE_UNSPECIFIED: _ClassVar[SnapshotState]
    SNAPSHOT_STATE_WRITING: _ClassVar[SnapshotState]
    SNAPSHOT_STATE_COMPLETE: _ClassVar[SnapshotState]
    SNAPSHOT_STATE_CORRUPT: _ClassVar[SnapshotState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_MODEL_REGISTERED: _ClassVar[EventKind]
    EVENT_KIND_MODEL_UNREGISTERED: _ClassVar[EventKind]
    EVENT_KIND_STATE_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_EVICTION: _ClassVar[EventKind]
    EVENT_KIND_LEASE_GRANTED: _ClassVar[EventKind]
    EVENT_KIND_LEASE_RELEASED: _ClassVar[EventKind]
    EVENT_KIND_LEASE_EXPIRED: _ClassVar[EventKind]
    EVENT_KIND_WORKER_EXITED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT_CREATED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT_DELETED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT_CORRUPT: _ClassVar[EventKind]
    EVENT_KIND_PINNED_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_GPU_DRAINING_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT_FAILED: _ClassVar[EventKind]
EVICT_MODE_UNSPECIFIED: EvictMode
EVICT_MODE_DRAIN: EvictMode
EVICT_MODE_ABORT: EvictMode
BACKEND_UNSPECIFIED: Backend
BACKEND_CPU: Backend
BACKEND_CUDA: Backend
SNAPSHOT_STATE_UNSPECIFIED: SnapshotState
SNAPSHOT_STATE_WRITING: SnapshotState
SNAPSHOT_STATE_COMPLETE: SnapshotState
SNAPSHOT_STATE_CORRUPT: SnapshotState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_MODEL_REGISTERED: EventKind
EVENT_KIND_MODEL_UNREGISTERED: EventKind
EVENT_KIND_STATE_CHANGED: EventKind
EVENT_KIND_EVICTION: EventKind
EVENT_KIND_LEASE_GRANTED: EventKind
EVENT_KIND_LEASE_RELEASED: EventKind
EVENT_KIND_LEASE_EXPIRED: EventKind
EVENT_KIND_WORKER_EXITED: EventKind
EVENT_KIND_SNAPSHOT_CREATED: EventKind
EVENT_KIND_SNAPSHOT_DELETED: EventKind
EVENT_KIND_SNAPSHOT_CORRUPT: EventKind
EVENT_KIND_PINNED_CHANGED: EventKind
EVENT_KIND_GPU_DRAINING_CHANGED: EventKind
EVENT_KIND_SNAPSHOT_FAILED: EventKind

class GpuInfo(_message.Message):
    __slots__ = ("index", "name", "uuid", "total_bytes", "used_bytes", "free_bytes", "draining")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    draining: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

class MemoryBudget(_message.Message):
    __slots__ = ("total_bytes", "used_bytes", "free_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    used_bytes: int
    free_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class RuntimeInfo(_message.Message):
    __slots__ = ("model", "runtime_id", "state", "tier", "gpu", "gpu_bytes", "host_bytes", "disk_bytes", "last_used", "leases", "keep_alive_until", "pinned", "restore_estimate", "worker_pid", "host_copy", "exchange_with")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    RESTORE_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    HOST_COPY_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_WITH_FIELD_NUMBER: _ClassVar[int]
    model: str
    runtime_id: str
    state: _common_pb2.RuntimeState
    tier: _common_pb2.Tier
    gpu: int
    gpu_bytes: int
    host_bytes: int
    disk_bytes: int
    last_used: _timestamp_pb2.Timestamp
    leases: int
    keep_alive_until: _timestamp_pb2.Timestamp
    pinned: bool
    restore_estimate: _duration_pb2.Duration
    worker_pid: int
    host_copy: bool
    exchange_with: str
    def __init__(self, model: _Optional[str] = ..., runtime_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., gpu: _Optional[int] = ..., gpu_bytes: _Optional[int] = ..., host_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., leases: _Optional[int] = ..., keep_alive_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pinned: _Optional[bool] = ..., restore_estimate: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., worker_pid: _Optional[int] = ..., host_copy: _Optional[bool] = ..., exchange_with: _Optional[str] = ...) -> None: ...

class ListResidencyRequest(_message.Message):
    __slots__ = ("model", "include_cold")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_COLD_FIELD_NUMBER: _ClassVar[int]
    model: str
    include_cold: bool
    def __init__(self, model: _Optional[str] = ..., include_cold: _Optional[bool] = ...) -> None: ...

class ListResidencyResponse(_message.Message):
    __slots__ = ("gpus", "runtimes", "host", "disk")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    runtimes: _containers.RepeatedCompositeFieldContainer[RuntimeInfo]
    host: MemoryBudget
    disk: MemoryBudget
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., runtimes: _Optional[_Iterable[_Union[RuntimeInfo, _Mapping]]] = ..., host: _Optional[_Union[MemoryBudget, _Mapping]] = ..., disk: _Optional[_Union[MemoryBudget, _Mapping]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("model", "runtime_id", "to_tier", "mode", "drain_timeout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    TO_TIER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    runtime_id: str
    to_tier: _common_pb2.Tier
    mode: EvictMode
    drain_timeout: _duration_pb2.Duration
    def __init__(self, model: _Optional[str] = ..., runtime_id: _Optional[str] = ..., to_tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., mode: _Optional[_Union[EvictMode, str]] = ..., drain_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("runtime_id", "draining", "progress", "done")
    class Done(_message.Message):
        __slots__ = ("state", "gpu_bytes_freed", "aborted_requests", "elapsed")
        STATE_FIELD_NUMBER: _ClassVar[int]
        GPU_BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
        ABORTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
        ELAPSED_FIELD_NUMBER: _ClassVar[int]
        state: _common_pb2.RuntimeState
        gpu_bytes_freed: int
        aborted_requests: int
        elapsed: _duration_pb2.Duration
        def __init__(self, state: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., gpu_bytes_freed: _Optional[int] = ..., aborted_requests: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    runtime_id: str
    draining: int
    progress: _common_pb2.TransferProgress
    done: EvictResponse.Done
    def __init__(self, runtime_id: _Optional[str] = ..., draining: _Optional[int] = ..., progress: _Optional[_Union[_common_pb2.TransferProgress, _Mapping]] = ..., done: _Optional[_Union[EvictResponse.Done, _Mapping]] = ...) -> None: ...

class SetPinnedRequest(_message.Message):
    __slots__ = ("model", "pinned")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    model: str
    pinned: bool
    def __init__(self, model: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class SetPinnedResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    priority: int
    def __init__(self, model: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("admit", "reason", "reason_code", "gpu", "victims", "estimate", "source_tier", "required_bytes")
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    VICTIMS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIER_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    admit: bool
    reason: str
    reason_code: str
    gpu: int
    victims: _containers.RepeatedCompositeFieldContainer[_common_pb2.Victim]
    estimate: _duration_pb2.Duration
    source_tier: _common_pb2.Tier
    required_bytes: int
    def __init__(self, admit: _Optional[bool] = ..., reason: _Optional[str] = ..., reason_code: _Optional[str] = ..., gpu: _Optional[int] = ..., victims: _Optional[_Iterable[_Union[_common_pb2.Victim, _Mapping]]] = ..., estimate: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., source_tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., required_bytes: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("kinds", "model", "gpu", "since", "after_id", "follow")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    model: str
    gpu: int
    since: _timestamp_pb2.Timestamp
    after_id: int
    follow: bool
    def __init__(self, kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ..., model: _Optional[str] = ..., gpu: _Optional[int] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., after_id: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "time", "kind", "model", "runtime_id", "gpu", "detail", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: _timestamp_pb2.Timestamp
    kind: EventKind
    model: str
    runtime_id: str
    gpu: int
    detail: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[EventKind, str]] = ..., model: _Optional[str] = ..., runtime_id: _Optional[str] = ..., gpu: _Optional[int] = ..., detail: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("snapshot_id", "model", "state", "manifest_hash", "fingerprint", "bytes", "unique_bytes", "chunks", "created_at", "last_used")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    model: str
    state: SnapshotState
    manifest_hash: str
    fingerprint: str
    bytes: int
    unique_bytes: int
    chunks: int
    created_at: _timestamp_pb2.Timestamp
    last_used: _timestamp_pb2.Timestamp
    def __init__(self, snapshot_id: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[_Union[SnapshotState, str]] = ..., manifest_hash: _Optional[str] = ..., fingerprint: _Optional[str] = ..., bytes: _Optional[int] = ..., unique_bytes: _Optional[int] = ..., chunks: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ("bytes_freed",)
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    bytes_freed: int
    def __init__(self, bytes_freed: _Optional[int] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("snapshots_deleted", "chunks_deleted", "bytes_freed")
    SNAPSHOTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DELETED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    snapshots_deleted: int
    chunks_deleted: int
    bytes_freed: int
    def __init__(self, snapshots_deleted: _Optional[int] = ..., chunks_deleted: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("gpu", "to_tier", "mode", "drain_timeout", "undrain")
    GPU_FIELD_NUMBER: _ClassVar[int]
    TO_TIER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    gpu: int
    to_tier: _common_pb2.Tier
    mode: EvictMode
    drain_timeout: _duration_pb2.Duration
    undrain: bool
    def __init__(self, gpu: _Optional[int] = ..., to_tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., mode: _Optional[_Union[EvictMode, str]] = ..., drain_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., undrain: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("evicted", "gpu")
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    evicted: _containers.RepeatedCompositeFieldContainer[_common_pb2.Victim]
    gpu: GpuInfo
    def __init__(self, evicted: _Optional[_Iterable[_Union[_common_pb2.Victim, _Mapping]]] = ..., gpu: _Optional[_Union[GpuInfo, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "backend", "gpus", "started_at", "uptime", "models", "workers", "hostname")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: Backend
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    started_at: _timestamp_pb2.Timestamp
    uptime: _duration_pb2.Duration
    models: int
    workers: int
    hostname: str
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., models: _Optional[int] = ..., workers: _Optional[int] = ..., hostname: _Optional[str] = ...) -> None: ...
