"""The registered models, as torpord serves them: what registering, unregistering and
pinning a model changes (catalog, policy state, the executor's sources, the API's limits,
the audit trail), and the `Model` message the API answers with.

One owner for the three views torpord keeps of a model: the catalog row (`registered`),
what a worker needs to build its runtime (`sources`, shared with the executor) and what the
API edge checks requests against (`limits`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path
from typing import Protocol

from torpor import chat_template
from torpor.checkpoint_files import CheckpointDir
from torpor.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TorporError,
)
from torpor.log import get_logger
from torpor.scheduler import convert, footprint, validate
from torpor.scheduler.checkpoints import CheckpointReader
from torpor.scheduler.controller import Controller
from torpor.scheduler.core import ModelRegistered, ModelUnregistered, PinChanged, SchedulerState
from torpor.scheduler.core import ModelSpec as CoreSpec
from torpor.scheduler.event_log import EventLog
from torpor.scheduler.executor import ModelSource
from torpor.store.catalog import Catalog
from torpor.store.names import check_source_path, validate_model_name
from torpor.store.records import RegisteredModel
from torpor.store.schema import DType, LoadFormat
from torpor.store.snapshots import SnapshotStore
from torpor.v1 import common_pb2

_log = get_logger("daemon")  # the events it logs were torpord's before it had a module


class LatestSnapshots(Protocol):
    """The newest snapshot of each model (the recorder's): model -> snapshot id."""

    latest: dict[str, str]

    def untrack(self, model: str, nbytes: int = 0) -> None:
        """Stop holding the model's snapshot as the policy's; its bytes count as outside."""

    async def measure_outside(self) -> None:
        """Measure the store's bytes outside the tracked snapshots again."""


class ModelRegistry:
    """Registers, unregisters and pins models, and describes them."""

    def __init__(
        self,
        *,
        controller: Controller,
        catalog: Catalog,
        snapshots: SnapshotStore,
        recorder: LatestSnapshots,
        events: EventLog,
        sources: dict[str, ModelSource],
        model_roots: tuple[Path, ...],
        cuda: bool,
        forget_timeout_s: float,
    ) -> None:
        self.controller = controller
        self.catalog = catalog
        self.snapshots = snapshots
        self.recorder = recorder
        self.events = events
        self.sources = sources  # the executor reads it: what each worker builds
        self.model_roots = model_roots
        self.cuda = cuda
        self.forget_timeout_s = forget_timeout_s
        """How long UnregisterModel waits for the model's worker to stop."""
        self.registered: dict[str, RegisteredModel] = {}
        self.limits: dict[str, validate.ModelLimits] = {}  # what the API edge checks against
        self.checkpoints = CheckpointReader()  # never the default pool (issue 12, FIFO)
        self._forgetting: dict[str, asyncio.Event] = {}  # unregistered, worker still stopping

    def names(self) -> list[str]:
        return sorted(self.sources)

    async def load_all(self, snapshot_bytes: dict[str, int]) -> None:
        """At start-up: admit every model of the catalog (`snapshot_bytes`: those that restore
        from a snapshot, with the bytes the store holds for it). A model whose checkpoint went
        away is logged; the rest serve."""
        for registered in await asyncio.to_thread(self.catalog.list_models):
            name = registered.spec.name
            try:
                await self._admit(registered, name in snapshot_bytes, snapshot_bytes.get(name, 0))
            except TorporError as err:
                _log.error("model_not_loaded", model=registered.spec.name, error=str(err))

    async def register(self, msg: common_pb2.ModelSpec, template: str = "") -> common_pb2.Model:
        """Register `msg`, with `template` (Jinja source) replacing its checkpoint's chat
        template when not empty."""
        validate_model_name(msg.name)  # before anything else: a name never becomes a path
        if not msg.source:
            raise InvalidArgument(
                "spec.source (the checkpoint directory) is required", reason="NO_SOURCE"
            )
        source = check_source_path(msg.source, self.model_roots)
        if template:
            chat_template.check_source(template)  # a template that cannot compile: now
        ckpt = CheckpointDir.confined(source, self.model_roots)
        load_format = convert.load_format(msg.load_format)
        if load_format is LoadFormat.DUMMY and not await self.checkpoints.run(
            msg.name, ckpt.exists, "config.json"
        ):
            raise InvalidArgument(
                f"{source} has no config.json: a dummy model (load_format dummy) needs one "
                "to shape its weights",
                reason="NO_CONFIG",
                metadata={"path": str(source)},
            )
        limit = await self.checkpoints.run(msg.name, footprint.max_positions, ckpt)
        dtype = DType(
            await self.checkpoints.run(msg.name, footprint.checkpoint_dtype, ckpt, self.cuda)
        )
        spec = convert.model_spec(msg, str(source), dtype, min(limit, 4096), template)
        if spec.max_seq_len > limit:
            raise InvalidArgument(
                f"max_seq_len={spec.max_seq_len} exceeds the model's "
                f"max_position_embeddings={limit}",
                reason="MAX_SEQ_LEN_TOO_LARGE",
            )
        if spec.dtype is DType.FP8 and not self.cuda:
            raise InvalidArgument(
                "fp8 needs a CUDA GPU with compute capability 8.9 or newer; this torpord runs "
                "the cpu backend. Register it as bfloat16, float16 or float32.",
                reason="FP8_UNSUPPORTED",
            )
        registered = await asyncio.to_thread(self.catalog.register_model, spec)
        try:
            await self._admit(registered, has_snapshot=False)
        except BaseException:
            await asyncio.to_thread(self.catalog.delete_model, spec.name)
            raise
        self.events.append(
            "model_registered",
            model=spec.name,
            source=spec.source_path,
            dtype=spec.dtype.value,
            load_format=spec.load_format.value,
        )
        return await self.model_message(spec.name)

    async def _admit(
        self, registered: RegisteredModel, has_snapshot: bool, snapshot_bytes: int = 0
    ) -> None:
        spec = registered.spec
        ckpt = CheckpointDir.confined(spec.source_path, self.model_roots)
        estimate = await self.checkpoints.run(
            spec.name,
            functools.partial(footprint.estimate, dummy=spec.load_format is LoadFormat.DUMMY),
            ckpt,
            spec.dtype.value,
            spec.max_batch,
            spec.max_seq_len,
            self.cuda,
        )
        if snapshot_bytes:  # what the store holds for it, not the estimate
            estimate = dataclasses.replace(estimate, snapshot=snapshot_bytes)
        vocab = await self.checkpoints.run(spec.name, footprint.vocab_size, ckpt)
        chat = await self.checkpoints.run(spec.name, _has_chat_template, ckpt, spec.chat_template)
        self.sources[spec.name] = ModelSource(
            Path(spec.source_path),
            spec.dtype.value,
            spec.max_batch,
            spec.max_seq_len,
            estimate,
            spec.chat_template,
            spec.load_format.value,
        )
        self.limits[spec.name] = validate.ModelLimits(vocab, spec.max_seq_len, chat)
        core_spec = CoreSpec(
            spec.name,
            estimate,
            priority=max(-100, min(100, spec.priority)),
            pinned=spec.pinned,
            keep_alive_s=spec.keep_alive_s,
        )
        try:
            self.controller.submit(ModelRegistered(core_spec, has_snapshot=has_snapshot))
        except BaseException:
            self.sources.pop(spec.name, None)
            self.limits.pop(spec.name, None)
            raise
        self.registered[spec.name] = registered

    async def unregister(self, name: str, delete_snapshots: bool) -> None:
        if name in self.registered and not delete_snapshots:
            held = await asyncio.to_thread(self.snapshots.list, name, include_corrupt=True)
            if held:
                raise FailedPrecondition(
                    f"model {name!r} has {len(held)} snapshot(s); unregister it with "
                    "delete_snapshots (torpor unregister --delete-snapshots), or delete them "
                    "first (torpor snapshots rm)",
                    reason="HAS_SNAPSHOTS",
                    metadata={"snapshots": len(held)},
                )
        self.controller.submit(ModelUnregistered(name))
        self.sources.pop(name, None)
        self.limits.pop(name, None)
        self.registered.pop(name, None)
        self.recorder.untrack(name)
        try:
            await asyncio.to_thread(self.snapshots.delete_model_snapshots, name)
        finally:
            await self.recorder.measure_outside()
        await asyncio.to_thread(self.catalog.delete_model, name)
        self.events.append("model_unregistered", model=name)
        await self._forgotten(name)

    async def _forgotten(self, name: str) -> None:
        """Wait until the core has forgotten `name`: a model with a worker is forgotten only
        once its worker is dropped, and until then registering the name again is refused
        (ALREADY_EXISTS), so UnregisterModel answers only then (issue 12)."""
        if name not in self.controller.state.models:
            return
        gone = self._forgetting.setdefault(name, asyncio.Event())
        limit = self.forget_timeout_s
        try:
            async with asyncio.timeout(limit):
                await gone.wait()
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {name!r} is unregistered, but its worker is still being stopped after "
                f"{limit:g} s; its name is free once it has stopped",
                reason="WORKER_STOPPING",
                metadata={"model": name},
            ) from None

    def plan_applied(self, state: SchedulerState) -> None:
        """After each step: wake the unregisters whose model the core has now forgotten."""
        for name in [n for n in self._forgetting if n not in state.models]:
            self._forgetting.pop(name).set()

    async def set_pinned(self, name: str, pinned: bool) -> common_pb2.Model:
        self.controller.submit(PinChanged(name, pinned))
        self.registered[name] = await asyncio.to_thread(self.catalog.set_model_pinned, name, pinned)
        self.events.append("pinned_changed", model=name, pinned=pinned)
        return await self.model_message(name)

    async def model_message(self, name: str) -> common_pb2.Model:
        registered = self.registered.get(name)
        if registered is None or name not in self.controller.state.models:
            raise NotFound(f"no model {name!r} is registered", reason="MODEL_NOT_FOUND")
        state = self.controller.state
        model = state.models[name]
        return common_pb2.Model(
            spec=convert.spec_message(registered.spec),
            registered_at=convert.timestamp(registered.created_at),
            state=convert.state_name(state.runtimes[model.runtime_id].state),
            footprint_bytes=model.spec.footprint.resident,
            snapshot_id=self.recorder.latest.get(name, ""),
            has_chat_template=self.limits[name].chat if name in self.limits else False,
        )


def _has_chat_template(ckpt: CheckpointDir, override: str) -> bool:
    """Whether a worker of this checkpoint can render chat prompts: it has a tokenizer, and a
    registered template or one of its own (chat_template.jinja, tokenizer_config.json)."""
    if not ckpt.exists("tokenizer.json"):
        return False
    return bool(override) or chat_template.checkpoint_template(ckpt) is not None
