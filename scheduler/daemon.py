"""torpord: start, serve, shut down.

    torpord [--config FILE] [--state-dir DIR] [--socket PATH] [--listen HOST:PORT]
            [--http-listen HOST:PORT] [--metrics-port N] [--backend auto|cuda|cpu]
            [--cpu-devices N] [--cpu-device-memory SIZE] [--demo]

Start-up: an exclusive lock on the state and the runtime directory (scheduler/instance.py: a
second torpord on either is refused, naming the running one's pid, before it touches
anything), config, catalog (SQLite by default) and snapshot store (scrubbed), GPU inventory,
metrics, the event log, policy state with the registered models (a model with a snapshot
restores from it), workers and keepers left by an earlier torpord stopped, then the gRPC
services on the Unix socket (and TCP if asked), the OpenAI-compatible HTTP API
(daemon.http_listen), and READY=1 to systemd. Each GPU's keeper
starts with its first worker (scheduler/keepers.py). SIGTERM: stop accepting, drain in-flight
calls up to the drain timeout, stop the workers, then the keepers, release the locks, exit 0.
Shutdown is start-up in reverse (one exit stack), and so is a start-up that fails: it stops
what it had started, prints one line and exits 1 (docs/ARCHITECTURE.md, "torpord's parts").
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
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType

from torpor import log
from torpor.errors import TorporError
from torpor.scheduler import convert, notify
from torpor.scheduler.admin import AdminService, DaemonInfo
from torpor.scheduler.api import SchedulerService
from torpor.scheduler.controller import Controller
from torpor.scheduler.core import (
    Costs,
    CostsUpdated,
    DiskOutsideMeasured,
    Event,
    GpuSpec,
    Plan,
    PolicyConfig,
    SchedulerState,
    initial_state,
)
from torpor.scheduler.daemon_config import (
    DaemonConfig,
    default_config_path,
    load_config,
    overrides_from_args,
)
from torpor.scheduler.event_log import EventLog
from torpor.scheduler.executor import (
    Executor,
    ModelSource,
    WorkerDefaults,
    check_worker_sockets_fit,
)
from torpor.scheduler.inflight import InflightCalls
from torpor.scheduler.instance import lock_directories
from torpor.scheduler.inventory import Inventory, from_config
from torpor.scheduler.keepers import KEEPER_CONTEXT, Keepers
from torpor.scheduler.metrics import Metrics
from torpor.scheduler.plan_log import record_plan
from torpor.scheduler.recorder import Recorder
from torpor.scheduler.registry import ModelRegistry
from torpor.scheduler.residency import ResidencyView
from torpor.scheduler.server import Server, check_socket_path
from torpor.scheduler.supervisor import Supervisor, WorkerProcess
from torpor.store import private
from torpor.store.catalog import Catalog
from torpor.store.snapshots import SnapshotStore

_log = log.get_logger("daemon")


class Daemon:
    """torpord: every long-lived part, built and started in one place (`_start`).

    `async with Daemon(config):` starts the parts in order, and each part that needs stopping
    puts its stop on one exit stack as it starts: shutdown is that stack unwound in reverse,
    and a start-up that fails at any step unwinds exactly what had started (in the manner of
    temporalio's `async with Worker(...)`). A Daemon starts once; `shutdown` is idempotent.
    """

    def __init__(self, config: DaemonConfig, demo: bool = False) -> None:
        self.config = config
        self.demo = demo
        self.started_at = time.time()
        self._stopping = asyncio.Event()
        self._stack: AsyncExitStack | None = None  # the started parts' stops, while serving
        self._entered = False

    async def __aenter__(self) -> Daemon:
        if self._entered:
            raise RuntimeError("a Daemon starts once")
        self._entered = True
        async with AsyncExitStack() as stack:
            try:
                await self._start(stack)
            except BaseException:
                self._stopping.set()  # workers that exit while it unwinds are expected to
                raise
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    def stop(self) -> None:
        """Make `run` return (what SIGTERM does)."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT (or `stop`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight calls, stop the workers, then the keepers, ...,
        release the locks: start-up's stack, unwound. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is None:  # never started (or refused at start-up), or stopped already
            return
        self._stopping.set()
        notify.notify("STOPPING=1")
        _log.info("torpord_stopping", drain_timeout_s=self.config.daemon.drain_timeout_s)
        await stack.aclose()
        _log.info("torpord_stopped")

    # -- start ---------------------------------------------------------------------------

    async def _start(self, stack: AsyncExitStack) -> None:
        """Start every part in order; each one's stop goes on `stack` as it starts."""
        cfg = self.config
        await _own_directories(stack, cfg)  # first: a second torpord has touched nothing
        catalog = await asyncio.to_thread(Catalog.open, cfg.catalog_config())
        stack.push_async_callback(asyncio.to_thread, catalog.close)
        snapshots = await asyncio.to_thread(
            SnapshotStore.open, catalog, cfg.snapshot_store_config()
        )
        inventory = from_config(cfg.backend)
        stack.callback(inventory.close)
        metrics = Metrics()
        if cfg.daemon.metrics_port:  # a port in use is refused before any worker moves
            stack.callback(metrics.serve(cfg.daemon.metrics_port).close)
        events = EventLog(catalog, metrics)
        events.start()
        stack.push_async_callback(events.close)
        core = await self._build_core(catalog, snapshots, inventory, metrics, events)
        stack.callback(core.controller.close_all)
        core.recorder.start_sweeping(cfg.store.sweep_interval_s)
        stack.push_async_callback(core.recorder.close)
        # From here workers run: on the way out they stop (then the keepers) once the
        # transitions have drained, and those only once the server stopped taking calls.
        stack.push_async_callback(core.supervisor.stop_all, cfg.worker.stop_timeout_s)
        stack.push_async_callback(core.executor.drain, cfg.daemon.drain_timeout_s)
        await _stop_leftovers(core.supervisor, core.keepers, cfg.worker.stop_timeout_s)
        known = await asyncio.to_thread(core.recorder.known_snapshots)
        await core.models.load_all({name: info.total_bytes for name, info in known.items()})
        await core.recorder.measure_outside()
        if self.demo:
            from torpor.scheduler.demo import ensure_demo_models

            await ensure_demo_models(Path(cfg.daemon.state_dir), core.models)
        server = self._server(core, inventory, events, snapshots)
        stack.push_async_callback(server.stop, cfg.daemon.drain_timeout_s)
        await server.start()
        if cfg.daemon.http_listen:  # after gRPC: the same services, one more door
            from torpor.scheduler.http_api.server import HttpApi  # aiohttp only when served

            http = HttpApi.from_config(cfg.daemon, server.scheduler, core.controller, metrics)
            stack.push_async_callback(http.stop)
            await http.start()
        notify.notify("READY=1\nSTATUS=serving")
        _log.info(
            "torpord_ready",
            socket=str(cfg.daemon.socket),
            listen=cfg.daemon.listen or None,
            http_listen=cfg.daemon.http_listen or None,
            backend=inventory.backend,
            gpus=len(core.controller.state.gpus),
            models=len(core.models.sources),
        )

    async def _build_core(
        self,
        catalog: Catalog,
        snapshots: SnapshotStore,
        inventory: Inventory,
        metrics: Metrics,
        events: EventLog,
    ) -> _Core:
        """The parts that call each other. The controller dispatches to the executor, which
        reports back to it, as do the recorder (measured costs) and the supervisor (a worker's
        exit); each plan wakes the registry. Their callbacks name `controller` and `models`,
        bound below before anything can call them: nothing moves until the models load."""
        cfg = self.config
        cuda = inventory.backend == "cuda"
        controller: Controller
        models: ModelRegistry

        def report(event: Event) -> None:  # a transition's end, measured costs, an exit
            controller.submit(event)

        recorder = Recorder(
            catalog,
            snapshots,
            lambda: controller.state.costs,
            lambda costs: report(CostsUpdated(costs)),
            metrics,
        )
        recorder.on_recorded = lambda info: events.append(
            "snapshot_created", model=info.model, snapshot=info.id, bytes=info.total_bytes
        )
        recorder.on_write_failed = lambda model, runtime, error: events.append(
            "snapshot_failed", model=model, runtime=runtime, reason=error.reason, error=str(error)
        )
        # The core owns the disk budget: it counts the recorder's tracked snapshots, and the
        # store's other bytes as measured (docs/POLICY.md, "The disk budget").
        recorder.tracked_models = lambda: controller.state.models.keys()
        recorder.on_outside = lambda nbytes: report(DiskOutsideMeasured(nbytes))
        state = await asyncio.to_thread(policy_state, cfg, inventory, recorder.costs, cuda)
        keepers = Keepers(
            Path(cfg.daemon.runtime_dir),
            enabled=keepers_enabled(cfg, cuda),
            start_timeout=cfg.worker.start_timeout_s,
            log_level=cfg.daemon.log_level,
        )
        metrics.count_keepers(keepers.running)
        calls = InflightCalls()

        async def worker_exited(worker: WorkerProcess) -> None:
            events.append(
                "worker_exited",
                model=worker.spec.model,
                runtime=worker.runtime_id,
                pid=worker.pid,
                returncode=worker.returncode,
                expected=worker.stopping,
            )
            died = executor.on_worker_exit(worker)
            if died is not None and not self._stopping.is_set():
                with contextlib.suppress(TorporError):
                    report(died)

        supervisor = Supervisor(
            Path(cfg.daemon.runtime_dir), worker_exited, cfg.worker.start_timeout_s, keepers=keepers
        )
        sources: dict[str, ModelSource] = {}  # the registry fills it, the executor reads it
        executor = Executor(
            supervisor,
            worker_defaults(cfg, cuda),
            sources,
            report,
            lambda model, tier, done, total, loading: controller.progress(
                model, tier, done, total, loading
            ),
            recorder,
            metrics,
            calls=calls,
        )

        def on_plan(before: SchedulerState, after: SchedulerState, plan: Plan) -> None:
            record_plan(events, metrics, before, after, plan)
            models.plan_applied(after)

        controller = Controller(state, executor, on_plan=on_plan)
        models = ModelRegistry(
            controller=controller,
            catalog=catalog,
            snapshots=snapshots,
            recorder=recorder,
            events=events,
            sources=sources,
            model_roots=tuple(Path(root) for root in cfg.daemon.model_roots),
            cuda=cuda,
            forget_timeout_s=cfg.worker.stop_timeout_s + 30,
        )
        return _Core(recorder, keepers, supervisor, executor, controller, models, calls, metrics)

    def _server(
        self, core: _Core, inventory: Inventory, events: EventLog, snapshots: SnapshotStore
    ) -> Server:
        """The two services, each handed the collaborators it uses, and their endpoints."""
        clocks = convert.Clocks()
        scheduler = SchedulerService(
            controller=core.controller,
            models=core.models,
            workers=core.executor,
            calls=core.calls,
            clocks=clocks,
            metrics=core.metrics,
        )
        admin = AdminService(
            controller=core.controller,
            models=core.models,
            residency=ResidencyView(core.controller, inventory, core.executor, clocks),
            calls=core.calls,
            events=events,
            snapshots=snapshots,
            recorder=core.recorder,
            info=DaemonInfo(self.started_at, inventory.backend == "cuda", core.recorder.host),
        )
        return Server(self.config.daemon, scheduler, admin)


@dataclasses.dataclass(frozen=True)
class _Core:
    """The parts `Daemon._build_core` wires together (see there)."""

    recorder: Recorder
    keepers: Keepers
    supervisor: Supervisor
    executor: Executor
    controller: Controller
    models: ModelRegistry
    calls: InflightCalls
    metrics: Metrics


async def _own_directories(stack: AsyncExitStack, cfg: DaemonConfig) -> None:
    """Make torpord's directories, lock the state and runtime directories (released last of
    all), and check the socket paths: a second torpord is refused here, before it moves
    anything (scheduler/instance.py)."""
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
    locks = await asyncio.to_thread(
        lock_directories,
        (Path(cfg.daemon.state_dir), "state directory"),
        (Path(cfg.daemon.runtime_dir), "runtime directory"),
    )
    for lock in locks:
        stack.callback(lock.release)
    # A file, or another server's live socket, at our socket path: refused before anything
    # moves (Server.start replaces only a stale socket).
    await asyncio.to_thread(check_socket_path, Path(cfg.daemon.socket))
    check_worker_sockets_fit(Path(cfg.daemon.runtime_dir))


async def _stop_leftovers(supervisor: Supervisor, keepers: Keepers, grace_s: float) -> None:
    """Workers of an earlier torpord are found and stopped: their runtimes are known again
    from the catalog (with their snapshots), and the policy starts from a clean slate."""
    for worker in await supervisor.adopt():
        _log.warning("leftover_worker_stopped", runtime=worker.runtime_id, pid=worker.pid)
        await worker.stop(grace_s)
    # Then their keepers: one keeper per GPU, and a keeper removes its socket as it stops.
    await keepers.stop_leftovers(grace_s)


def keepers_enabled(cfg: DaemonConfig, cuda: bool) -> bool:
    """A keeper per GPU: on CUDA, and only where deep suspends (its one use) happen."""
    return cuda and cfg.worker.keeper and cfg.worker.deep_suspend


def policy_state(
    cfg: DaemonConfig, inventory: Inventory, measured: Callable[[Costs], Costs], cuda: bool
) -> SchedulerState:
    """The policy's first state: the GPUs less their reserve, the budgets, and the costs
    this host measured before (`measured`: blocking, it reads the catalog)."""
    reserve = cfg.budgets.gpu_reserve if cuda else 0
    if keepers_enabled(cfg, cuda):  # each GPU's keeper holds a CUDA context of its own
        reserve += KEEPER_CONTEXT
    gpus = tuple(
        GpuSpec(g.index, g.total_bytes, min(reserve, g.total_bytes - 1), g.name)
        for g in inventory.gpus()
    )
    knobs = {f.name for f in dataclasses.fields(PolicyConfig)}
    knobs -= {"deep_suspend", "exchange_swap", "exchange_slack_bytes"}
    policy = PolicyConfig(
        **{name: getattr(cfg.policy, name) for name in knobs},
        deep_suspend=cfg.worker.deep_suspend,
        # Not yet run on a GPU (docs/PAGER.md, "Exchange swap"): auto is the CPU backend only.
        exchange_swap=cfg.worker.exchange_swap == "on"
        or (cfg.worker.exchange_swap == "auto" and not cuda),
        exchange_slack_bytes=cfg.worker.handle_size,
    )
    costs = measured(Costs())
    if keepers_enabled(cfg, cuda):  # deep resumes are filled by the keeper at DMA speed
        costs = dataclasses.replace(costs, deep_refill=costs.host_to_gpu)
    return initial_state(
        gpus,
        host_budget=cfg.budgets.host_memory,
        disk_budget=cfg.store.capacity,
        costs=costs,
        config=policy,
    )


def worker_defaults(cfg: DaemonConfig, cuda: bool) -> WorkerDefaults:
    return WorkerDefaults(
        runtime_dir=Path(cfg.daemon.runtime_dir),
        store=Path(cfg.store.snapshot_dir),
        cuda=cuda,
        handle_size=str(cfg.worker.handle_size),
        graph_pool="512MiB",
        python=str(cfg.worker.python),
        log_level=cfg.daemon.log_level,
        stop_grace_s=cfg.worker.stop_timeout_s,
        transition_timeout_s=cfg.worker.transition_timeout_s,
        model_roots=tuple(Path(root) for root in cfg.daemon.model_roots),
    )


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
        "--http-listen", help='the OpenAI-compatible HTTP API on HOST:PORT ("": off)'
    )
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus metrics on 127.0.0.1:PORT (0: off)"
    )
    parser.add_argument("--backend", choices=["auto", "cuda", "cpu"], help="GPU backend")
    parser.add_argument("--cpu-devices", type=int, help="simulated devices (cpu backend)")
    parser.add_argument("--cpu-device-memory", help="memory of each simulated device, e.g. 256MiB")
    parser.add_argument("--demo", action="store_true", help="create and register three demo models")
    return parser.parse_args(argv)


async def _serve(config: DaemonConfig, demo: bool) -> int:
    try:
        async with Daemon(config, demo) as daemon:
            await daemon.run()
    except TorporError as err:  # refused at start-up: what had started is stopped again
        print(f"torpord: {err}", file=sys.stderr)
        return 1
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
