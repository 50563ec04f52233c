import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from torpor.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExchangeSide(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXCHANGE_SIDE_UNSPECIFIED: _ClassVar[ExchangeSide]
    EXCHANGE_SIDE_OUT: _ClassVar[ExchangeSide]
    EXCHANGE_SIDE_IN: _ClassVar[ExchangeSide]

class LoadPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_PHASE_UNSPECIFIED: _ClassVar[LoadPhase]
    LOAD_PHASE_WEIGHTS: _ClassVar[LoadPhase]
    LOAD_PHASE_HOST_COPY: _ClassVar[LoadPhase]
EXCHANGE_SIDE_UNSPECIFIED: ExchangeSide
EXCHANGE_SIDE_OUT: ExchangeSide
EXCHANGE_SIDE_IN: ExchangeSide
LOAD_PHASE_UNSPECIFIED: LoadPhase
LOAD_PHASE_WEIGHTS: LoadPhase
LOAD_PHASE_HOST_COPY: LoadPhase

class Arena(_message.Message):
    __slots__ = ("name", "base_address", "reserved_bytes", "mapped_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_address: int
    reserved_bytes: int
    mapped_bytes: int
    def __init__(self, name: _Optional[str] = ..., base_address: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., mapped_bytes: _Optional[int] = ...) -> None: ...

class WorkerLoadRequest(_message.Message):
    __slots__ = ("model", "source", "model_dir", "dtype", "max_batch", "max_seq_len", "snapshot_id", "model_roots", "target", "keep_host_copy", "staging_bytes", "chat_template", "load_format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROOTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KEEP_HOST_COPY_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    source: _common_pb2.Tier
    model_dir: str
    dtype: _common_pb2.Dtype
    max_batch: int
    max_seq_len: int
    snapshot_id: str
    model_roots: _containers.RepeatedScalarFieldContainer[str]
    target: _common_pb2.RuntimeState
    keep_host_copy: bool
    staging_bytes: int
    chat_template: str
    load_format: _common_pb2.LoadFormat
    def __init__(self, model: _Optional[str] = ..., source: _Optional[_Union[_common_pb2.Tier, str]] = ..., model_dir: _Optional[str] = ..., dtype: _Optional[_Union[_common_pb2.Dtype, str]] = ..., max_batch: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., snapshot_id: _Optional[str] = ..., model_roots: _Optional[_Iterable[str]] = ..., target: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., keep_host_copy: _Optional[bool] = ..., staging_bytes: _Optional[int] = ..., chat_template: _Optional[str] = ..., load_format: _Optional[_Union[_common_pb2.LoadFormat, str]] = ...) -> None: ...

class LoadTimings(_message.Message):
    __slots__ = ("weights", "graphs", "total")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    weights: _duration_pb2.Duration
    graphs: _duration_pb2.Duration
    total: _duration_pb2.Duration
    def __init__(self, weights: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., graphs: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WorkerLoadResponse(_message.Message):
    __slots__ = ("progress", "done")
    class Progress(_message.Message):
        __slots__ = ("phase", "bytes_done", "bytes_total")
        PHASE_FIELD_NUMBER: _ClassVar[int]
        BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
        BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
        phase: LoadPhase
        bytes_done: int
        bytes_total: int
        def __init__(self, phase: _Optional[_Union[LoadPhase, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...
    class Done(_message.Message):
        __slots__ = ("timings", "status")
        TIMINGS_FIELD_NUMBER: _ClassVar[int]
        STATUS_FIELD_NUMBER: _ClassVar[int]
        timings: LoadTimings
        status: WorkerStatusResponse
        def __init__(self, timings: _Optional[_Union[LoadTimings, _Mapping]] = ..., status: _Optional[_Union[WorkerStatusResponse, _Mapping]] = ...) -> None: ...
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: WorkerLoadResponse.Progress
    done: WorkerLoadResponse.Done
    def __init__(self, progress: _Optional[_Union[WorkerLoadResponse.Progress, _Mapping]] = ..., done: _Optional[_Union[WorkerLoadResponse.Done, _Mapping]] = ...) -> None: ...

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_text", "prompt_token_ids", "prompt_chat", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_text: str
    prompt_token_ids: _common_pb2.TokenIds
    prompt_chat: _common_pb2.ChatPrompt
    sampling: _common_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., prompt_chat: _Optional[_Union[_common_pb2.ChatPrompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class WorkerSuspendRequest(_message.Message):
    __slots__ = ("level", "abort")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    level: _common_pb2.Tier
    abort: bool
    def __init__(self, level: _Optional[_Union[_common_pb2.Tier, str]] = ..., abort: _Optional[bool] = ...) -> None: ...

class WorkerSuspendResponse(_message.Message):
    __slots__ = ("state", "gpu_bytes_released", "host_bytes_released", "gpu_bytes_remaining", "unmap", "checkpoint", "total")
    STATE_FIELD_NUMBER: _ClassVar[int]
    GPU_BYTES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    GPU_BYTES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    UNMAP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.RuntimeState
    gpu_bytes_released: int
    host_bytes_released: int
    gpu_bytes_remaining: int
    unmap: _duration_pb2.Duration
    checkpoint: _duration_pb2.Duration
    total: _duration_pb2.Duration
    def __init__(self, state: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., gpu_bytes_released: _Optional[int] = ..., host_bytes_released: _Optional[int] = ..., gpu_bytes_remaining: _Optional[int] = ..., unmap: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., checkpoint: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WorkerResumeRequest(_message.Message):
    __slots__ = ("source", "target", "keep_host_copy")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KEEP_HOST_COPY_FIELD_NUMBER: _ClassVar[int]
    source: _common_pb2.Tier
    target: _common_pb2.RuntimeState
    keep_host_copy: bool
    def __init__(self, source: _Optional[_Union[_common_pb2.Tier, str]] = ..., target: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., keep_host_copy: _Optional[bool] = ...) -> None: ...

class WorkerResumeResponse(_message.Message):
    __slots__ = ("progress", "done")
    class Done(_message.Message):
        __slots__ = ("tier", "bytes", "checkpoint_restore", "map", "copy", "total", "streamed")
        TIER_FIELD_NUMBER: _ClassVar[int]
        BYTES_FIELD_NUMBER: _ClassVar[int]
        CHECKPOINT_RESTORE_FIELD_NUMBER: _ClassVar[int]
        MAP_FIELD_NUMBER: _ClassVar[int]
        COPY_FIELD_NUMBER: _ClassVar[int]
        TOTAL_FIELD_NUMBER: _ClassVar[int]
        STREAMED_FIELD_NUMBER: _ClassVar[int]
        tier: _common_pb2.Tier
        bytes: int
        checkpoint_restore: _duration_pb2.Duration
        map: _duration_pb2.Duration
        copy: _duration_pb2.Duration
        total: _duration_pb2.Duration
        streamed: bool
        def __init__(self, tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., bytes: _Optional[int] = ..., checkpoint_restore: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., map: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., copy: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., streamed: _Optional[bool] = ...) -> None: ...
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.TransferProgress
    done: WorkerResumeResponse.Done
    def __init__(self, progress: _Optional[_Union[_common_pb2.TransferProgress, _Mapping]] = ..., done: _Optional[_Union[WorkerResumeResponse.Done, _Mapping]] = ...) -> None: ...

class WorkerSnapshotRequest(_message.Message):
    __slots__ = ("reserved_bytes",)
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    reserved_bytes: int
    def __init__(self, reserved_bytes: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("hash", "size")
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    hash: str
    size: int
    def __init__(self, hash: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class WorkerSnapshotResponse(_message.Message):
    __slots__ = ("progress", "done")
    class Done(_message.Message):
        __slots__ = ("snapshot_id", "manifest_hash", "bytes", "bytes_written", "chunks", "elapsed", "fingerprint", "chunk_refs")
        SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
        MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
        BYTES_FIELD_NUMBER: _ClassVar[int]
        BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
        CHUNKS_FIELD_NUMBER: _ClassVar[int]
        ELAPSED_FIELD_NUMBER: _ClassVar[int]
        FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
        CHUNK_REFS_FIELD_NUMBER: _ClassVar[int]
        snapshot_id: str
        manifest_hash: str
        bytes: int
        bytes_written: int
        chunks: int
        elapsed: _duration_pb2.Duration
        fingerprint: str
        chunk_refs: _containers.RepeatedCompositeFieldContainer[SnapshotChunk]
        def __init__(self, snapshot_id: _Optional[str] = ..., manifest_hash: _Optional[str] = ..., bytes: _Optional[int] = ..., bytes_written: _Optional[int] = ..., chunks: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., fingerprint: _Optional[str] = ..., chunk_refs: _Optional[_Iterable[_Union[SnapshotChunk, _Mapping]]] = ...) -> None: ...
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.TransferProgress
    done: WorkerSnapshotResponse.Done
    def __init__(self, progress: _Optional[_Union[_common_pb2.TransferProgress, _Mapping]] = ..., done: _Optional[_Union[WorkerSnapshotResponse.Done, _Mapping]] = ...) -> None: ...

class WorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatusResponse(_message.Message):
    __slots__ = ("state", "model", "device", "gpu_bytes", "host_bytes", "disk_bytes", "pid", "arenas", "active_requests", "snapshot_id", "peak_mapped_bytes", "staging_bytes")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ARENAS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    PEAK_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.RuntimeState
    model: str
    device: str
    gpu_bytes: int
    host_bytes: int
    disk_bytes: int
    pid: int
    arenas: _containers.RepeatedCompositeFieldContainer[Arena]
    active_requests: int
    snapshot_id: str
    peak_mapped_bytes: int
    staging_bytes: int
    def __init__(self, state: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., gpu_bytes: _Optional[int] = ..., host_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., pid: _Optional[int] = ..., arenas: _Optional[_Iterable[_Union[Arena, _Mapping]]] = ..., active_requests: _Optional[int] = ..., snapshot_id: _Optional[str] = ..., peak_mapped_bytes: _Optional[int] = ..., staging_bytes: _Optional[int] = ...) -> None: ...

class WorkerExchangeRequest(_message.Message):
    __slots__ = ("side", "board_path", "timeout")
    SIDE_FIELD_NUMBER: _ClassVar[int]
    BOARD_PATH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    side: ExchangeSide
    board_path: str
    timeout: _duration_pb2.Duration
    def __init__(self, side: _Optional[_Union[ExchangeSide, str]] = ..., board_path: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WorkerExchangeResponse(_message.Message):
    __slots__ = ("state", "bytes", "steps", "waited", "total")
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.RuntimeState
    bytes: int
    steps: int
    waited: _duration_pb2.Duration
    total: _duration_pb2.Duration
    def __init__(self, state: _Optional[_Union[_common_pb2.RuntimeState, str]] = ..., bytes: _Optional[int] = ..., steps: _Optional[int] = ..., waited: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WorkerShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
