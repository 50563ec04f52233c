"""The `torpor.v1` API has what docs/API.md names as the contract, in the package's conventions.

Table-driven over the descriptors of the generated stubs: each service's methods with their
request and response types and streaming, the fields the contract names with their types,
and the enums with their values. Then conventions checked over every definition: enum zero
values, enum value prefixes, request/response names, and a comment on everything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)

from torpor import protogen
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2, worker_pb2

FILES: list[FileDescriptor] = [
    m.DESCRIPTOR for m in (common_pb2, scheduler_pb2, admin_pb2, worker_pb2)
]
PACKAGE = "torpor.v1"

# method -> (request, response, server-streaming)
SERVICES: dict[str, dict[str, tuple[str, str, bool]]] = {
    "Scheduler": {
        "RegisterModel": ("RegisterModelRequest", "RegisterModelResponse", False),
        "UnregisterModel": ("UnregisterModelRequest", "UnregisterModelResponse", False),
        "GetModel": ("GetModelRequest", "GetModelResponse", False),
        "ListModels": ("ListModelsRequest", "ListModelsResponse", False),
        "Acquire": ("AcquireRequest", "AcquireEvent", True),
        "Renew": ("RenewRequest", "RenewResponse", False),
        "Release": ("ReleaseRequest", "ReleaseResponse", False),
        "Generate": ("GenerateRequest", "GenerateChunk", True),
        "Prefetch": ("PrefetchRequest", "PrefetchResponse", False),
    },
    "Admin": {
        "ListResidency": ("ListResidencyRequest", "ListResidencyResponse", False),
        "Evict": ("EvictRequest", "EvictResponse", True),
        "SetPinned": ("SetPinnedRequest", "SetPinnedResponse", False),
        "Explain": ("ExplainRequest", "ExplainResponse", False),
        "WatchEvents": ("WatchEventsRequest", "Event", True),
        "ListSnapshots": ("ListSnapshotsRequest", "ListSnapshotsResponse", False),
        "DeleteSnapshot": ("DeleteSnapshotRequest", "DeleteSnapshotResponse", False),
        "CollectGarbage": ("CollectGarbageRequest", "CollectGarbageResponse", False),
        "Drain": ("DrainRequest", "DrainResponse", False),
        "GetStatus": ("GetStatusRequest", "GetStatusResponse", False),
    },
    "Worker": {
        "Load": ("WorkerLoadRequest", "WorkerLoadResponse", True),
        "Generate": ("WorkerGenerateRequest", "GenerateChunk", True),
        "Suspend": ("WorkerSuspendRequest", "WorkerSuspendResponse", False),
        "Resume": ("WorkerResumeRequest", "WorkerResumeResponse", True),
        "Snapshot": ("WorkerSnapshotRequest", "WorkerSnapshotResponse", True),
        "Status": ("WorkerStatusRequest", "WorkerStatusResponse", False),
        "Shutdown": ("WorkerShutdownRequest", "WorkerShutdownResponse", False),
        "Exchange": ("WorkerExchangeRequest", "WorkerExchangeResponse", False),
    },
}

# Streamed messages that the contract names itself, instead of `<Method>Response`.
CONTRACT_STREAM_NAMES = {"AcquireEvent", "GenerateChunk", "Event"}

TS = "google.protobuf.Timestamp"
DUR = "google.protobuf.Duration"

# message -> {field: "[repeated |optional ]TYPE[ in ONEOF]"}: the fields docs/API.md and the
# issues that use the API (5: daemon, 6: CLI, 3: worker) name. Types in torpor.v1 are short.
FIELDS: dict[str, dict[str, str]] = {
    "ModelSpec": {
        "name": "string",
        "source": "string",
        "dtype": "Dtype",
        "max_batch": "uint32",
        "max_seq_len": "uint32",
        "priority": "int32",
        "pinned": "bool",
        "keep_alive_s": "uint32",
    },
    "RegisterModelRequest": {"spec": "ModelSpec", "chat_template": "string"},
    "Model": {
        "spec": "ModelSpec",
        "state": "RuntimeState",
        "registered_at": TS,
        "has_chat_template": "bool",
    },
    "ListModelsResponse": {"models": "repeated Model"},
    "AcquireRequest": {"model": "string", "deadline": TS, "priority": "int32"},
    "AcquireEvent": {
        "queued": "AcquireEvent.Queued in event",
        "evicting": "AcquireEvent.Evicting in event",
        "loading": "TransferProgress in event",
        "restoring": "TransferProgress in event",
        "ready": "AcquireEvent.Ready in event",
    },
    "AcquireEvent.Queued": {"position": "uint32", "queue_depth": "uint32"},
    "AcquireEvent.Evicting": {"victims": "repeated Victim"},
    "AcquireEvent.Ready": {
        "lease_id": "string",
        "expires_at": TS,
        "gpu": "uint32",
        "worker_endpoint": "string",
    },
    "Victim": {
        "model": "string",
        "to_tier": "Tier",
        "bytes_freed": "uint64",
        "score": "double",
        "exchange": "bool",
    },
    "TransferProgress": {"tier": "Tier", "bytes_done": "uint64", "bytes_total": "uint64"},
    "RenewRequest": {"lease_id": "string"},
    "RenewResponse": {"expires_at": TS},
    "ReleaseRequest": {"lease_id": "string"},
    "GenerateRequest": {
        "model": "string in target",
        "lease_id": "string in target",
        "prompt_text": "string in prompt",
        "prompt_token_ids": "TokenIds in prompt",
        "prompt_chat": "ChatPrompt in prompt",
        "sampling": "SamplingParams",
    },
    "TokenIds": {"ids": "repeated uint32"},
    # Issue 14: chat messages, rendered by the model's chat template.
    "ChatPrompt": {"messages": "repeated ChatMessage", "add_generation_prompt": "bool"},
    "ChatMessage": {"role": "string", "content": "string"},
    "SamplingParams": {
        "max_tokens": "uint32",
        "temperature": "float",
        "top_p": "float",
        "top_k": "uint32",
        "seed": "optional uint64",
        "stop": "repeated string",
        "stop_token_ids": "repeated uint32",
        "ignore_eos": "bool",
        "logprobs": "bool",
        "top_logprobs": "uint32",
    },
    "GenerateChunk": {
        "token_ids": "repeated uint32",
        "text": "string",
        "logprobs": "repeated float",
        "usage": "Usage",
        "token_logprobs": "repeated TokenLogprobs",
    },
    "TokenLogprob": {"token_id": "uint32", "logprob": "float", "token_bytes": "bytes"},
    "TokenLogprobs": {"chosen": "TokenLogprob", "top": "repeated TokenLogprob"},
    "Usage": {
        "prompt_tokens": "uint32",
        "completion_tokens": "uint32",
        "finish_reason": "FinishReason",
        "timings": "GenerateTimings",
        "restored_from": "Tier",
    },
    "GenerateTimings": {"queued": DUR, "restore": DUR, "first_token": DUR, "total": DUR},
    "PrefetchRequest": {"model": "string", "tier": "Tier"},
    "GpuInfo": {
        "index": "uint32",
        "name": "string",
        "total_bytes": "uint64",
        "used_bytes": "uint64",
        "free_bytes": "uint64",
    },
    "RuntimeInfo": {
        "model": "string",
        "runtime_id": "string",
        "state": "RuntimeState",
        "tier": "Tier",
        "gpu": "optional uint32",
        "gpu_bytes": "uint64",
        "host_bytes": "uint64",
        "disk_bytes": "uint64",
        "last_used": TS,
        "leases": "uint32",
        "keep_alive_until": TS,
        "pinned": "bool",
        "restore_estimate": DUR,
        "worker_pid": "uint32",
        "host_copy": "bool",
        "exchange_with": "string",
    },
    "WorkerExchangeRequest": {
        "side": "ExchangeSide",
        "board_path": "string",
        "timeout": DUR,
    },
    "WorkerExchangeResponse": {
        "state": "RuntimeState",
        "bytes": "uint64",
        "steps": "uint32",
        "waited": DUR,
        "total": DUR,
    },
    "ListResidencyResponse": {"gpus": "repeated GpuInfo", "runtimes": "repeated RuntimeInfo"},
    "EvictRequest": {
        "model": "string",
        "to_tier": "Tier",
        "mode": "EvictMode",
        "drain_timeout": DUR,
    },
    "SetPinnedRequest": {"model": "string", "pinned": "bool"},
    "ExplainRequest": {"model": "string"},
    "ExplainResponse": {
        "admit": "bool",
        "reason": "string",
        "gpu": "optional uint32",
        "victims": "repeated Victim",
        "estimate": DUR,
        "source_tier": "Tier",
    },
    "WatchEventsRequest": {
        "kinds": "repeated EventKind",
        "model": "string",
        "since": f"{TS} in start",
        "after_id": "uint64 in start",
        "follow": "bool",
    },
    "Event": {
        "id": "uint64",
        "time": TS,
        "kind": "EventKind",
        "model": "string",
        "runtime_id": "string",
        "gpu": "optional uint32",
        "detail": "string",
        "attributes": "map<string, string>",
    },
    "ListSnapshotsResponse": {"snapshots": "repeated SnapshotInfo"},
    "DeleteSnapshotRequest": {"snapshot_id": "string"},
    "DrainRequest": {"gpu": "uint32"},
    "GetStatusResponse": {
        "version": "string",
        "backend": "Backend",
        "gpus": "repeated GpuInfo",
        "uptime": DUR,
    },
    "WorkerLoadRequest": {
        "source": "Tier",
        "model_dir": "string",
        "snapshot_id": "string",
        "dtype": "Dtype",
        "max_batch": "uint32",
        "max_seq_len": "uint32",
        "target": "RuntimeState",
        "keep_host_copy": "bool",
        "chat_template": "string",
    },
    "WorkerLoadResponse": {
        "progress": "WorkerLoadResponse.Progress in event",
        "done": "WorkerLoadResponse.Done in event",
    },
    "WorkerLoadResponse.Progress": {
        "phase": "LoadPhase",
        "bytes_done": "uint64",
        "bytes_total": "uint64",
    },
    "WorkerGenerateRequest": {
        "prompt_text": "string in prompt",
        "prompt_token_ids": "TokenIds in prompt",
        "prompt_chat": "ChatPrompt in prompt",
        "sampling": "SamplingParams",
    },
    "WorkerSuspendRequest": {"level": "Tier"},
    # Issue 13: what torpord decided crosses the wire as typed fields.
    "WorkerResumeRequest": {"source": "Tier", "target": "RuntimeState", "keep_host_copy": "bool"},
    "WorkerSuspendResponse": {"gpu_bytes_released": "uint64", "total": DUR},
    "WorkerResumeResponse.Done": {"tier": "Tier", "bytes": "uint64", "total": DUR},
    "WorkerSnapshotResponse.Done": {
        "snapshot_id": "string",
        "manifest_hash": "string",
        "bytes": "uint64",
    },
    "WorkerStatusResponse": {
        "state": "RuntimeState",
        "gpu_bytes": "uint64",
        "host_bytes": "uint64",
        "disk_bytes": "uint64",
        "pid": "uint32",
        "arenas": "repeated Arena",
    },
    "Arena": {"name": "string", "base_address": "uint64", "mapped_bytes": "uint64"},
}

# enum -> its values without the prefix, after UNSPECIFIED, in number order from 1.
ENUMS: dict[str, list[str]] = {
    # The tier table of docs/ARCHITECTURE.md, then the transitional states.
    "RuntimeState": [
        "RESIDENT",
        "SUSPENDED_HOST",
        "SUSPENDED_DEEP",
        "SUSPENDED_DISK",
        "SNAPSHOT",
        "COLD",
        "LOADING",
        "SUSPENDING",
        "RESUMING",
        "FAILED",
    ],
    "Tier": ["GPU", "HOST", "DEEP", "DISK", "DROP", "SOURCE"],
    "Dtype": ["FLOAT32", "BFLOAT16", "FLOAT16", "FP8"],
    "FinishReason": ["STOP", "LENGTH", "ABORT"],
    "EvictMode": ["DRAIN", "ABORT"],
    "ExchangeSide": ["OUT", "IN"],
    "Backend": ["CPU", "CUDA"],
    "SnapshotState": ["WRITING", "COMPLETE", "CORRUPT"],
}

_SCALARS = {
    getattr(FieldDescriptor, name): name.removeprefix("TYPE_").lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_") and name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def _short(full_name: str) -> str:
    return full_name.removeprefix(PACKAGE + ".")


def _message(name: str) -> Descriptor:
    outer, *inner = name.split(".")
    for file in FILES:
        if outer in file.message_types_by_name:
            desc = file.message_types_by_name[outer]
            for part in inner:
                desc = desc.nested_types_by_name[part]
            return desc
    raise AssertionError(f"message {PACKAGE}.{name} is missing")


def _value_prefix(enum: str) -> str:
    """The prefix of an enum's values, as buf spells it: `RuntimeState` -> `RUNTIME_STATE_`."""
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", enum).upper() + "_"


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _short(field.message_type.full_name)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _short(field.enum_type.full_name)
    return _SCALARS[field.type]


def describe(field: FieldDescriptor) -> str:
    """A field as the FIELDS table writes it."""
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields
        return f"map<{_type_name(key)}, {_type_name(value)}>"
    text = _type_name(field)
    oneof = field.containing_oneof
    if field.is_repeated:
        text = "repeated " + text
    elif oneof is not None and oneof.name == f"_{field.name}":  # proto3 `optional`
        text = "optional " + text
    elif oneof is not None:
        text = f"{text} in {oneof.name}"
    return text


@pytest.mark.parametrize(("service", "method"), [(s, m) for s in SERVICES for m in SERVICES[s]])
def test_service_method(service: str, method: str) -> None:
    request, response, streaming = SERVICES[service][method]
    desc: ServiceDescriptor = next(
        f.services_by_name[service] for f in FILES if service in f.services_by_name
    )
    rpc = desc.methods_by_name.get(method)
    assert rpc is not None, f"{service}.{method} is missing"
    assert _short(rpc.input_type.full_name) == request
    assert _short(rpc.output_type.full_name) == response
    assert rpc.server_streaming is streaming
    assert rpc.client_streaming is False


def test_services_have_only_the_contract_methods() -> None:
    for service, methods in SERVICES.items():
        desc = next(f.services_by_name[service] for f in FILES if service in f.services_by_name)
        assert sorted(desc.methods_by_name) == sorted(methods), service


def test_the_api_page_names_the_contract_methods() -> None:
    """docs/API.md's "Services" tables, where the contract is written, list every method of
    each service and no other: the page and this test cannot drift apart."""
    text = (Path(__file__).parents[2] / "docs" / "API.md").read_text()
    services = text.split("\n## Services\n", 1)[1].split("\n## ", 1)[0]
    parts = services.split("\n### ")[1:]
    assert [part.split()[0] for part in parts] == list(SERVICES)
    for service, part in zip(SERVICES, parts, strict=True):
        rows = [line.split("|")[1] for line in part.splitlines() if line.startswith("| `")]
        named = {name for cell in rows for name in re.findall(r"`(\w+)`", cell)}
        assert named == set(SERVICES[service]), service


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_message_fields(message: str) -> None:
    fields = _message(message).fields_by_name
    for name, expected in FIELDS[message].items():
        assert name in fields, f"{message}.{name} is missing"
        assert describe(fields[name]) == expected, f"{message}.{name}"


@pytest.mark.parametrize("enum", sorted(ENUMS))
def test_enum_values(enum: str) -> None:
    desc = next(f.enum_types_by_name[enum] for f in FILES if enum in f.enum_types_by_name)
    prefix = _value_prefix(enum)
    expected = [prefix + "UNSPECIFIED", *(prefix + v for v in ENUMS[enum])]
    assert [v.name for v in desc.values] == expected
    assert [v.number for v in desc.values] == list(range(len(expected)))


def test_optional_seed_tracks_presence() -> None:
    params = common_pb2.SamplingParams()
    assert not params.HasField("seed")
    params.seed = 0
    assert params.HasField("seed")


def test_oneofs_hold_one_value() -> None:
    request = scheduler_pb2.GenerateRequest(model="m", prompt_text="hi")
    request.lease_id = "lease"
    request.prompt_token_ids.ids.extend([1, 2])
    assert request.WhichOneof("target") == "lease_id"
    assert request.WhichOneof("prompt") == "prompt_token_ids"
    assert not request.model
    assert not request.prompt_text


def _messages() -> Iterator[Descriptor]:
    stack = [m for f in FILES for m in f.message_types_by_name.values()]
    while stack:
        message = stack.pop()
        if not message.GetOptions().map_entry:
            yield message
            stack.extend(message.nested_types)


def test_every_enum_is_prefixed_and_starts_unspecified() -> None:
    enums = [e for f in FILES for e in f.enum_types_by_name.values()]
    enums += [e for m in _messages() for e in m.enum_types]
    assert len(enums) >= len(ENUMS)
    for enum in enums:
        prefix = _value_prefix(enum.name)
        assert enum.values[0].name == prefix + "UNSPECIFIED", enum.full_name
        assert enum.values[0].number == 0, enum.full_name
        assert all(v.name.startswith(prefix) for v in enum.values), enum.full_name


def test_request_and_response_names_follow_the_method() -> None:
    for file in FILES:
        for service in file.services_by_name.values():
            for rpc in service.methods:
                stems = {rpc.name, service.name + rpc.name}
                request, response = rpc.input_type.name, rpc.output_type.name
                assert request in {s + "Request" for s in stems}, rpc.full_name
                if response not in CONTRACT_STREAM_NAMES:
                    assert response in {s + "Response" for s in stems}, rpc.full_name


def _documentable_paths(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, tuple]]:
    """(name, source path) of every message, field, oneof, enum, value, service and method."""

    # Field numbers of FileDescriptorProto / DescriptorProto / ... in descriptor.proto.
    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple) -> Iterator[tuple[str, tuple]]:
        yield e.name, path
        for i, value in enumerate(e.value):
            yield value.name, (*path, 2, i)

    def message(m: descriptor_pb2.DescriptorProto, path: tuple) -> Iterator[tuple[str, tuple]]:
        if m.options.map_entry:
            return
        yield m.name, path
        for i, field in enumerate(m.field):
            yield f"{m.name}.{field.name}", (*path, 2, i)
        for i, nested in enumerate(m.nested_type):
            yield from message(nested, (*path, 3, i))
        for i, nested_enum in enumerate(m.enum_type):
            yield from enum(nested_enum, (*path, 4, i))
        for i, oneof in enumerate(m.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of `optional` fields
                yield f"{m.name}.{oneof.name}", (*path, 8, i)

    for i, m in enumerate(file.message_type):
        yield from message(m, (4, i))
    for i, e in enumerate(file.enum_type):
        yield from enum(e, (5, i))
    for i, service in enumerate(file.service):
        yield service.name, (6, i)
        for j, method in enumerate(service.method):
            yield f"{service.name}.{method.name}", (6, i, 2, j)


@pytest.mark.parametrize("proto", sorted(p.name for p in protogen.PACKAGE_DIR.glob("*.proto")))
def test_everything_is_documented(proto: str, tmp_path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    import grpc_tools

    out = tmp_path / "set.pb"
    include = f"-I{grpc_tools.__path__[0]}/_proto"
    args = ["protoc", f"-I{protogen.PROTO_ROOT}", include, "--include_source_info"]
    assert protoc.main([*args, f"--descriptor_set_out={out}", f"torpor/v1/{proto}"]) == 0
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    commented = {
        tuple(loc.path)
        for loc in file.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    paths = list(_documentable_paths(file))
    assert paths
    undocumented = [name for name, path in paths if path not in commented]
    assert undocumented == []
