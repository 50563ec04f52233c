"""torpord: start, serve, shut down.

    torpord [--config FILE] [--state-dir DIR] [--socket PATH] [--listen HOST:PORT]
            [--metrics-port N] [--backend auto|cuda|cpu] [--cpu-devices N]
            [--cpu-device-memory SIZE] [--demo]

Start-up: an exclusive lock on the state and the runtime directory (scheduler/instance.py: a
second torpord on either is refused, naming the running one's pid, before it touches
anything), config, catalog (SQLite by default) and snapshot store (scrubbed), GPU inventory,
policy state with the registered models (a model with a snapshot restores from it), workers
and keepers left by an earlier torpord stopped, then the gRPC services on the Unix socket
(and TCP if asked), metrics, and READY=1 to systemd. Each GPU's keeper starts with its first
worker (scheduler/keepers.py). SIGTERM: stop accepting, drain in-flight calls up to the
drain timeout, stop the workers, then the keepers, release the locks, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from torpor import log
from torpor.checkpoint_files import CheckpointDir
from torpor.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TorporError,
)
from torpor.scheduler import convert, footprint, notify, validate
from torpor.scheduler.checkpoints import CheckpointReader
from torpor.scheduler.config import (
    DaemonConfig,
    default_config_path,
    load_config,
    overrides_from_args,
)
from torpor.scheduler.controller import Controller
from torpor.scheduler.core import (
    CostsUpdated,
    DiskOutsideMeasured,
    GpuSpec,
    ModelRegistered,
    ModelUnregistered,
    Plan,
    PolicyConfig,
    SchedulerState,
    initial_state,
)
from torpor.scheduler.core import ModelSpec as CoreSpec
from torpor.scheduler.events import EventLog
from torpor.scheduler.executor import (
    Executor,
    ModelSource,
    WorkerDefaults,
    check_worker_sockets_fit,
)
from torpor.scheduler.instance import InstanceLock, lock_directories
from torpor.scheduler.inventory import from_config
from torpor.scheduler.keepers import KEEPER_CONTEXT, Keepers
from torpor.scheduler.metrics import Metrics
from torpor.scheduler.plan_log import record_plan
from torpor.scheduler.recorder import Recorder
from torpor.scheduler.server import Server, check_socket_path
from torpor.scheduler.supervisor import Supervisor, WorkerProcess
from torpor.store import private
from torpor.store.catalog import Catalog
from torpor.store.names import check_source_path, validate_model_name
from torpor.store.records import RegisteredModel
from torpor.store.schema import DType
from torpor.store.snapshots import SnapshotStore
from torpor.v1 import common_pb2

_log = log.get_logger("daemon")


class Daemon:
    """Every long-lived part of torpord, started and stopped together."""

    def __init__(self, config: DaemonConfig, demo: bool = False) -> None:
        self.config = config
        self.demo = demo
        self.started_at = time.time()
        self.clocks = convert.Clocks()
        self.metrics = Metrics()
        self.sources: dict[str, ModelSource] = {}
        self.registered: dict[str, RegisteredModel] = {}
        self._forgetting: dict[str, asyncio.Event] = {}  # unregistered, worker still stopping
        self.limits: dict[str, validate.ModelLimits] = {}  # what the API edge checks against
        self._stopping = asyncio.Event()
        self._started = False
        self._locks: list[InstanceLock] = []
        self.checkpoints = CheckpointReader()  # never the default pool (issue 12, FIFO)

    # -- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("Daemon.start() called twice")
        self._started = True
        cfg = self.config
        # Private whatever the umask (issue 12), and made before the locks below would make
        # them with the umask's mode (making a missing directory touches nothing of a running
        # torpord). The runtime directory lets group torpor reach the API socket (0660), as
        # systemd's RuntimeDirectoryMode=0750 does.
        for directory, mode in (
            (cfg.daemon.state_dir, private.PRIVATE_DIR),
            (cfg.daemon.runtime_dir, 0o750),
            (cfg.store.snapshot_dir, private.PRIVATE_DIR),
        ):
            # One that cannot be made is reported by the lock below (state and runtime
            # directories, LOCK_FAILED) or by the store when it opens (snapshots).
            with contextlib.suppress(OSError):
                await asyncio.to_thread(private.make_dirs, directory, mode)
        # First of all: a second torpord on our directories would stop our workers, take our
        # sockets and serve our catalog. Refused here, it has touched nothing.
        self._locks = await asyncio.to_thread(
            lock_directories,
            (Path(cfg.daemon.state_dir), "state directory"),
            (Path(cfg.daemon.runtime_dir), "runtime directory"),
        )
        # A file, or another server's live socket, at our socket path: refused before anything
        # moves (Server.start replaces only a stale socket).
        await asyncio.to_thread(check_socket_path, Path(cfg.daemon.socket))
        check_worker_sockets_fit(Path(cfg.daemon.runtime_dir))
        self.catalog = await asyncio.to_thread(Catalog.open, cfg.catalog_config())
        self.snapshots = await asyncio.to_thread(
            SnapshotStore.open, self.catalog, cfg.snapshot_store_config()
        )
        self.inventory = from_config(cfg.backend)
        self.cuda = self.inventory.backend == "cuda"
        self.recorder = Recorder(
            self.catalog,
            self.snapshots,
            lambda: self.controller.state.costs,
            self._costs,
            self.metrics,
        )
        state = await asyncio.to_thread(self._initial_state)
        self.keepers = Keepers(
            Path(cfg.daemon.runtime_dir),
            enabled=self._keepers_enabled(),
            start_timeout=cfg.worker.start_timeout_s,
            log_level=cfg.daemon.log_level,
        )
        self.metrics.count_keepers(self.keepers.running)
        self.supervisor = Supervisor(
            Path(cfg.daemon.runtime_dir),
            self._worker_exited,
            cfg.worker.start_timeout_s,
            keepers=self.keepers,
        )
        self.executor = Executor(
            self.supervisor,
            self._worker_defaults(),
            self.sources,
            self._report,
            self._progress,
            self.recorder,
            self.metrics,
        )
        self.controller = Controller(state, self.executor, on_plan=self._on_plan)
        self.events = EventLog(self.catalog, self.metrics)
        self.events.start()
        self.recorder.on_recorded = lambda info: self.events.append(
            "snapshot_created", model=info.model, snapshot=info.id, bytes=info.total_bytes
        )
        self.recorder.on_write_failed = lambda model, runtime, error: self.events.append(
            "snapshot_failed", model=model, runtime=runtime, reason=error.reason, error=str(error)
        )
        # The core owns the disk budget: it counts the recorder's tracked snapshots, and the
        # store's other bytes as measured (docs/POLICY.md, "The disk budget").
        self.recorder.tracked_models = lambda: self.controller.state.models.keys()
        self.recorder.on_outside = lambda nbytes: self.controller.submit(
            DiskOutsideMeasured(nbytes)
        )
        self.recorder.start_sweeping(cfg.store.sweep_interval_s)
        await self._stop_leftover_workers()
        await self._load_models()
        if self.demo:
            from torpor.scheduler.demo import ensure_demo_models

            await ensure_demo_models(self)
        self.server = Server(self)
        await self.server.start()
        self.metrics_server = (
            self.metrics.serve(cfg.daemon.metrics_port) if cfg.daemon.metrics_port else None
        )
        notify.notify("READY=1\nSTATUS=serving")
        _log.info(
            "torpord_ready",
            socket=str(cfg.daemon.socket),
            listen=cfg.daemon.listen or None,
            backend=self.inventory.backend,
            gpus=len(state.gpus),
            models=len(self.sources),
        )

    def _initial_state(self) -> SchedulerState:
        cfg = self.config
        reserve = cfg.budgets.gpu_reserve if self.cuda else 0
        if self._keepers_enabled():  # each GPU's keeper holds a CUDA context of its own
            reserve += KEEPER_CONTEXT
        gpus = tuple(
            GpuSpec(g.index, g.total_bytes, min(reserve, g.total_bytes - 1), g.name)
            for g in self.inventory.gpus()
        )
        knobs = {f.name for f in dataclasses.fields(PolicyConfig)} - {"deep_suspend"}
        policy = PolicyConfig(
            **{name: getattr(cfg.policy, name) for name in knobs},
            deep_suspend=cfg.worker.deep_suspend,
        )
        from torpor.scheduler.core import Costs

        costs = self.recorder.costs(Costs())
        if self._keepers_enabled():  # deep resumes are filled by the keeper at DMA speed
            costs = dataclasses.replace(costs, deep_refill=costs.host_to_gpu)
        return initial_state(
            gpus,
            host_budget=cfg.budgets.host_memory,
            disk_budget=cfg.store.capacity,
            costs=costs,
            config=policy,
        )

    def _keepers_enabled(self) -> bool:
        """A keeper per GPU: on CUDA, and only where deep suspends (its one use) happen."""
        worker = self.config.worker
        return self.cuda and worker.keeper and worker.deep_suspend

    def _worker_defaults(self) -> WorkerDefaults:
        cfg = self.config
        return WorkerDefaults(
            runtime_dir=Path(cfg.daemon.runtime_dir),
            store=Path(cfg.store.snapshot_dir),
            cuda=self.cuda,
            handle_size=str(cfg.worker.handle_size),
            graph_pool="512MiB",
            python=str(cfg.worker.python),
            log_level=cfg.daemon.log_level,
            stop_grace_s=cfg.worker.stop_timeout_s,
            transition_timeout_s=cfg.worker.transition_timeout_s,
            model_roots=tuple(Path(root) for root in cfg.daemon.model_roots),
        )

    async def _stop_leftover_workers(self) -> None:
        # Workers of an earlier torpord are found and stopped: their runtimes are known again
        # from the catalog (with their snapshots), and the policy starts from a clean slate.
        for worker in await self.supervisor.adopt():
            _log.warning("leftover_worker_stopped", runtime=worker.runtime_id, pid=worker.pid)
            await worker.stop(self.config.worker.stop_timeout_s)
        # Then their keepers: one keeper per GPU, and a keeper removes its socket as it stops.
        await self.keepers.stop_leftovers(self.config.worker.stop_timeout_s)

    async def _load_models(self) -> None:
        snapshots = await asyncio.to_thread(self.recorder.known_snapshots)
        for registered in await asyncio.to_thread(self.catalog.list_models):
            known = snapshots.get(registered.spec.name)
            try:
                size = known.total_bytes if known is not None else 0
                await self._admit_model(registered, known is not None, snapshot_bytes=size)
            except TorporError as err:  # a checkpoint that went away: keep serving the rest
                _log.error("model_not_loaded", model=registered.spec.name, error=str(err))
        await self.recorder.measure_outside()

    # -- models --------------------------------------------------------------------------

    async def register(self, msg: common_pb2.ModelSpec) -> common_pb2.Model:
        validate_model_name(msg.name)  # before anything else: a name never becomes a path
        if not msg.source:
            raise InvalidArgument(
                "spec.source (the checkpoint directory) is required", reason="NO_SOURCE"
            )
        source = check_source_path(msg.source, self.config.daemon.model_roots)
        ckpt = CheckpointDir.confined(source, self.config.daemon.model_roots)
        limit = await self.checkpoints.run(msg.name, footprint.max_positions, ckpt)
        dtype = DType(await self.checkpoints.run(msg.name, footprint.checkpoint_dtype, ckpt))
        spec = convert.model_spec(msg, str(source), dtype, min(limit, 4096))
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
            await self._admit_model(registered, has_snapshot=False)
        except BaseException:
            await asyncio.to_thread(self.catalog.delete_model, spec.name)
            raise
        self.events.append(
            "model_registered", model=spec.name, source=spec.source_path, dtype=spec.dtype.value
        )
        return await self.model_message(spec.name)

    async def _admit_model(
        self, registered: RegisteredModel, has_snapshot: bool, snapshot_bytes: int = 0
    ) -> None:
        spec = registered.spec
        ckpt = CheckpointDir.confined(spec.source_path, self.config.daemon.model_roots)
        estimate = await self.checkpoints.run(
            spec.name,
            footprint.estimate,
            ckpt,
            spec.dtype.value,
            spec.max_batch,
            spec.max_seq_len,
            self.cuda,
        )
        if snapshot_bytes:  # what the store holds for it, not the estimate
            estimate = dataclasses.replace(estimate, snapshot=snapshot_bytes)
        vocab = await self.checkpoints.run(spec.name, footprint.vocab_size, ckpt)
        self.sources[spec.name] = ModelSource(
            Path(spec.source_path), spec.dtype.value, spec.max_batch, spec.max_seq_len, estimate
        )
        self.limits[spec.name] = validate.ModelLimits(vocab, spec.max_seq_len)
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
        self.recorder.latest.pop(name, None)
        await asyncio.to_thread(self.snapshots.delete_model_snapshots, name)
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
        limit = self.config.worker.stop_timeout_s + 30
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
        )

    # -- wiring --------------------------------------------------------------------------

    def _report(self, event: Any) -> None:
        self.controller.submit(event)

    def _progress(self, model: str, tier: Any, done: int, total: int, loading: bool) -> None:
        self.controller.progress(model, tier, done, total, loading)

    def _costs(self, costs: Any) -> None:
        self.controller.submit(CostsUpdated(costs))

    async def _worker_exited(self, worker: WorkerProcess) -> None:
        self.events.append(
            "worker_exited",
            model=worker.spec.model,
            runtime=worker.runtime_id,
            pid=worker.pid,
            returncode=worker.returncode,
            expected=worker.stopping,
        )
        died = self.executor.on_worker_exit(worker)
        if died is not None and not self._stopping.is_set():
            with contextlib.suppress(TorporError):
                self.controller.submit(died)

    def _on_plan(self, before: SchedulerState, state: SchedulerState, plan: Plan) -> None:
        record_plan(self, before, state, plan)
        for name in [n for n in self._forgetting if n not in state.models]:
            self._forgetting.pop(name).set()

    def tier_usage(self) -> tuple[int, int]:
        state = self.controller.state
        held = [state.held(r) for r in state.runtimes.values()]
        # The disk ledger: the runtimes' snapshots plus the store's bytes outside them.
        return sum(h.host for h in held), sum(h.disk for h in held) + state.disk_outside

    def first_event_id_since(self, since: Any) -> int:
        last = 0
        while True:
            batch = self.catalog.events_after(last, limit=1000)
            for event in batch:
                if event.ts.replace(tzinfo=None) >= since.replace(tzinfo=None):
                    return event.id - 1
                last = event.id
            if len(batch) < 1000:
                return last

    def last_event_id(self) -> int:
        last = 0
        while batch := self.catalog.events_after(last, limit=1000):
            last = batch[-1].id
        return last

    # -- run and stop --------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        await self.shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight calls, stop workers. Idempotent."""
        if getattr(self, "_shut", False):
            return
        self._shut = True
        if not self._locks:  # refused at start-up: nothing here is ours to stop
            return
        self._stopping.set()
        notify.notify("STOPPING=1")
        grace = self.config.daemon.drain_timeout_s
        _log.info("torpord_stopping", drain_timeout_s=grace)
        await self.server.stop(grace)
        await self.executor.drain(grace)
        await self.supervisor.stop_all(self.config.worker.stop_timeout_s)
        await self.recorder.close()
        self.controller.close_all()
        await self.events.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        await asyncio.to_thread(self.catalog.close)
        for lock in self._locks:
            lock.release()
        _log.info("torpord_stopped")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torpord", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default $TORPOR_CONFIG or /etc/torpor/torpord.toml)",
    )
    parser.add_argument("--state-dir", help="catalog, snapshots and model roots live here")
    parser.add_argument("--socket", help="Unix socket to serve on")
    parser.add_argument("--listen", help="also serve on TCP HOST:PORT")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus metrics on 127.0.0.1:PORT (0: off)"
    )
    parser.add_argument("--backend", choices=["auto", "cuda", "cpu"], help="GPU backend")
    parser.add_argument("--cpu-devices", type=int, help="simulated devices (cpu backend)")
    parser.add_argument("--cpu-device-memory", help="memory of each simulated device, e.g. 256MiB")
    parser.add_argument("--demo", action="store_true", help="create and register three demo models")
    return parser.parse_args(argv)


async def _serve(config: DaemonConfig, demo: bool) -> int:
    daemon = Daemon(config, demo)
    try:
        await daemon.start()
    except TorporError as err:
        print(f"torpord: {err}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await daemon.shutdown()
        return 1
    await daemon.run()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = args.config or default_config_path(os.environ)
        config = load_config(path, overrides=overrides_from_args(args))
    except TorporError as err:
        print(f"torpord: {err}", file=sys.stderr)
        sys.exit(2)
    log.configure(json=config.daemon.log_json, level=config.daemon.log_level)
    sys.exit(asyncio.run(_serve(config, args.demo)))


if __name__ == "__main__":
    main()
