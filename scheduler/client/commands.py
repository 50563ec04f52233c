"""The client commands that ask and answer: global options, ps, status, models, register,
unregister, pin, unpin, explain and snapshots. The streaming ones are in streams.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from torpor.errors import InvalidArgument, Unavailable
from torpor.scheduler.client import render, shapes
from torpor.scheduler.client.credentials import TcpOptions
from torpor.scheduler.client.exits import fail
from torpor.scheduler.client.session import ClientOptions, emit, session, wants_json
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
ModelArg = Annotated[
    str, typer.Argument(metavar="NAME", help="Name of a registered model.", show_default=False)
]

DTYPES: dict[str, str] = {
    "auto": "DTYPE_UNSPECIFIED",
    "float32": "DTYPE_FLOAT32",
    "fp32": "DTYPE_FLOAT32",
    "bfloat16": "DTYPE_BFLOAT16",
    "bf16": "DTYPE_BFLOAT16",
    "float16": "DTYPE_FLOAT16",
    "fp16": "DTYPE_FLOAT16",
    "fp8": "DTYPE_FP8",
}
"""--dtype spellings; auto keeps the checkpoint's own dtype (fp8 for an FP8 checkpoint on a
CUDA torpord)."""
LOAD_FORMATS = {"checkpoint": "LOAD_FORMAT_CHECKPOINT", "dummy": "LOAD_FORMAT_DUMMY"}
"""--load-format spellings."""


def global_options(
    ctx: typer.Context,
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            envvar="TORPOR_SOCKET",
            help="torpord's Unix socket (default: the daemon's own, /run/torpor/torpord.sock "
            "unless its config or environment moves it).",
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Reach torpord over TCP at HOST:PORT.")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.001,
            help="Deadline of each call in seconds (default: 60 for quick calls; calls that "
            "wait, such as generate and evict, fail after 600 without a word from torpord).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            envvar="TORPOR_TOKEN_FILE",
            help="TCP: a file holding the bearer token (default: $TORPOR_TOKEN).",
            show_default=False,
        ),
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls", help="TCP: use TLS, trusting the system's CAs.")
    ] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            envvar="TORPOR_TLS_CA",
            help="TCP: use TLS, trusting this PEM CA bundle.",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            envvar="TORPOR_TLS_CERT",
            help="TCP: client certificate (PEM), for a daemon that asks for one.",
            show_default=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            "--tls-key", envvar="TORPOR_TLS_KEY", help="Key of --tls-cert.", show_default=False
        ),
    ] = None,
    tls_server_name: Annotated[
        str | None,
        typer.Option(
            "--tls-server-name",
            help="TCP: the name the daemon's certificate must carry (default: the host).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Page initialized LLM runtimes between GPU, host RAM and NVMe."""
    source = ctx.get_parameter_source("socket")
    if address is not None and source is not None and source.name == "ENVIRONMENT":
        socket = None  # --address on the command line beats $TORPOR_SOCKET
    tcp = TcpOptions(token_file, tls, tls_ca, tls_cert, tls_key, tls_server_name)
    ctx.obj = ClientOptions(socket=socket, address=address, timeout=timeout, json=as_json, tcp=tcp)


def ps(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Only runtimes of this model.")] = None,
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="Also list models with no runtime (cold).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """GPUs and the runtimes on them: state, tier, bytes per tier, leases, keep-alive."""
    request = admin_pb2.ListResidencyRequest(model=model or "", include_cold=all_)
    with session(ctx) as conn:
        reply = conn.unary(conn.admin.ListResidency, request)
        dummies: frozenset[str] = frozenset()
        if not as_json:  # marked in the text only: the JSON shape is fixed (`torpor models`)
            listed = conn.unary(conn.scheduler.ListModels, scheduler_pb2.ListModelsRequest())
            dummies = frozenset(
                m.spec.name
                for m in listed.models
                if m.spec.load_format == common_pb2.LOAD_FORMAT_DUMMY
            )
    budgets = shapes.budgets(reply)  # shown in the text only: the JSON shape is fixed
    emit(
        ctx,
        as_json,
        shapes.residency(reply),
        lambda doc: render.residency(doc, budgets, dummies),
    )


def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Health, version, backend and GPUs of the daemon; exits 8 unless it is serving."""
    with session(ctx) as conn:
        reply = conn.unary(conn.admin.GetStatus, admin_pb2.GetStatusRequest())
        doc = shapes.status(reply, conn.health_status())
    emit(ctx, as_json, doc, render.status)
    if doc["health"] != "serving":
        fail(Unavailable(f"torpord is up but {doc['health']}", reason="NOT_SERVING"))


def models(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(metavar="NAME", help="Show only this model.", show_default=False),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Registered models: spec, state, GPU footprint, newest snapshot."""
    with session(ctx) as conn:
        if name is None:
            reply = conn.unary(conn.scheduler.ListModels, scheduler_pb2.ListModelsRequest())
            docs = [shapes.model(m) for m in reply.models]
        else:
            one = conn.unary(conn.scheduler.GetModel, scheduler_pb2.GetModelRequest(name=name))
            docs = [shapes.model(one.model)]
    emit(ctx, as_json, {"models": docs}, lambda doc: render.models(doc["models"]))


def register(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="Unique model name, e.g. llama3:70b.")
    ],
    source_dir: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE_DIR", help="Hugging Face checkpoint directory (under a model root)."
        ),
    ],
    dtype: Annotated[
        str,
        typer.Option(
            help="float32, bfloat16, float16 or fp8 (fp32, bf16, fp16); auto: the checkpoint's "
            "own (an FP8 checkpoint's: fp8 on a GPU; other dtypes dequantize it)."
        ),
    ] = "auto",
    max_batch: Annotated[
        int, typer.Option(min=0, help="Concurrent sequences; 0 is the daemon's default.")
    ] = 0,
    max_seq_len: Annotated[
        int, typer.Option(min=0, help="Tokens per sequence; 0 is the checkpoint's.")
    ] = 0,
    priority: Annotated[int, typer.Option(help="-100..100; higher is evicted later.")] = 0,
    pin: Annotated[bool, typer.Option("--pin", help="Never evict it.")] = False,
    keep_alive: Annotated[
        int, typer.Option(min=0, help="Seconds after last use it is not evicted.")
    ] = 0,
    chat_template: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="A Jinja chat template that replaces the checkpoint's own (for chat prompts).",
        ),
    ] = None,
    load_format: Annotated[
        str,
        typer.Option(
            help="checkpoint (its safetensors) or dummy (random weights shaped by config.json; "
            "SOURCE_DIR needs only config.json, and a tokenizer for text prompts).",
        ),
    ] = "checkpoint",
    as_json: JsonOption = False,
) -> None:
    """Register a model with torpord."""
    if dtype.strip().lower() not in DTYPES:
        fail(InvalidArgument(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}"))
    if load_format.strip().lower() not in LOAD_FORMATS:
        fail(
            InvalidArgument(
                f"--load-format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}"
            )
        )
    template = "" if chat_template is None else _read_template(chat_template)
    spec = common_pb2.ModelSpec(
        name=name,
        source=str(source_dir.expanduser().absolute()),  # the daemon needs an absolute path
        dtype=DTYPES[dtype.strip().lower()],
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        priority=priority,
        pinned=pin,
        keep_alive_s=keep_alive,
        load_format=LOAD_FORMATS[load_format.strip().lower()],
    )
    with session(ctx) as conn:
        reply = conn.unary(
            conn.scheduler.RegisterModel,
            scheduler_pb2.RegisterModelRequest(spec=spec, chat_template=template),
        )
    _print_model(ctx, as_json, "registered", reply.model)


def _read_template(path: Path) -> str:
    """The chat template in `path` (read here, by the user who runs the CLI: torpord never
    opens it)."""
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(InvalidArgument(f"--chat-template {str(path)!r} cannot be read: {exc}"))
    if not text:
        fail(InvalidArgument(f"--chat-template {str(path)!r} is empty"))
    return text


def unregister(
    ctx: typer.Context,
    name: ModelArg,
    delete_snapshots: Annotated[
        bool, typer.Option(help="Delete its snapshots now rather than at the next gc.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Stop a model's runtimes and forget it."""
    request = scheduler_pb2.UnregisterModelRequest(name=name, delete_snapshots=delete_snapshots)
    with session(ctx) as conn:
        conn.unary(conn.scheduler.UnregisterModel, request)
    doc = {"model": name, "unregistered": True, "snapshots_deleted": delete_snapshots}
    emit(ctx, as_json, doc, lambda _: render.show(f"unregistered {name}"))


def pin(ctx: typer.Context, name: ModelArg, as_json: JsonOption = False) -> None:
    """Pin a model: its runtimes are never evicted."""
    _set_pinned(ctx, name, True, as_json)


def unpin(ctx: typer.Context, name: ModelArg, as_json: JsonOption = False) -> None:
    """Unpin a model: its idle runtimes may be evicted again."""
    _set_pinned(ctx, name, False, as_json)


def _set_pinned(ctx: typer.Context, name: str, pinned: bool, as_json: bool) -> None:
    with session(ctx) as conn:
        reply = conn.unary(
            conn.admin.SetPinned, admin_pb2.SetPinnedRequest(model=name, pinned=pinned)
        )
    _print_model(ctx, as_json, "pinned" if pinned else "unpinned", reply.model)


def _print_model(ctx: typer.Context, as_json: bool, verb: str, model: common_pb2.Model) -> None:
    emit(ctx, as_json, shapes.model(model), lambda doc: render.model_line(verb, doc))


def explain(
    ctx: typer.Context,
    name: ModelArg,
    priority: Annotated[int, typer.Option(help="Priority of the hypothetical acquire.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """What an acquire of the model would do now, without doing it.

    Admit or not and why, the target GPU, the victims (tier, bytes freed, score), the
    estimated time and the tier it would restore from.
    """
    with session(ctx) as conn:
        reply = conn.unary(
            conn.admin.Explain, admin_pb2.ExplainRequest(model=name, priority=priority)
        )
    emit(ctx, as_json, shapes.plan(name, reply), render.plan)


snapshots_app = typer.Typer(
    name="snapshots", help="Snapshots in the chunk store.", no_args_is_help=True
)


@snapshots_app.command("ls")
def snapshots_ls(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Only snapshots of this model.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List snapshots, newest first."""
    with session(ctx) as conn:
        reply = conn.unary(
            conn.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest(model=model or "")
        )
    docs = [shapes.snapshot(s) for s in reply.snapshots]
    emit(ctx, as_json, {"snapshots": docs}, lambda doc: render.snapshots(doc["snapshots"]))


@snapshots_app.command("rm")
def snapshots_rm(
    ctx: typer.Context,
    snapshot_id: Annotated[str, typer.Argument(metavar="ID", help="Snapshot id (see ls).")],
    as_json: JsonOption = False,
) -> None:
    """Delete a snapshot and the chunks no other snapshot shares."""
    request = admin_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
    with session(ctx) as conn:
        reply = conn.unary(conn.admin.DeleteSnapshot, request)
    doc = {"snapshot_id": snapshot_id, "bytes_freed": reply.bytes_freed}
    if wants_json(ctx, as_json):
        render.print_json(doc)
    else:
        render.show(f"deleted {snapshot_id}, {render.size(reply.bytes_freed)} freed")


@snapshots_app.command("gc")
def snapshots_gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option(help="Only say what would be deleted.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete unreferenced chunks and the snapshots of unregistered models."""
    with session(ctx) as conn:
        reply = conn.unary(
            conn.admin.CollectGarbage, admin_pb2.CollectGarbageRequest(dry_run=dry_run)
        )
    doc = {
        "dry_run": dry_run,
        "snapshots_deleted": reply.snapshots_deleted,
        "chunks_deleted": reply.chunks_deleted,
        "bytes_freed": reply.bytes_freed,
    }
    if wants_json(ctx, as_json):
        render.print_json(doc)
        return
    verb = "would delete" if dry_run else "deleted"
    render.show(
        f"{verb} {reply.snapshots_deleted} snapshots and {reply.chunks_deleted} chunks, "
        f"{render.size(reply.bytes_freed)}"
    )
