"""Exchange swap on the CPU backend (real arenas: mmap + memfd; real host buffers): two runtimes
trade places on a device and a host budget that each hold one of them, handle by handle.

The two sides run on two threads of this process here; in torpord they are two workers that
share the board file the same way (tests/worker/test_exchange_rpc.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.pager import procfs
from torpor.errors import Aborted, FailedPrecondition, TorporError
from torpor.exchange_board import Board, Side, Status
from torpor.worker.engine.demo import DemoSpec, make_demo
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest, GenerationResult
from torpor.worker.engine.sampling import SamplingParams
from torpor.worker.pager.paged_state import PagedState, SuspendLevel
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.pager.runtime import PagedRuntime

MiB = 1 << 20
OPTIONS = EngineOptions(max_batch=2, max_seq_len=256)
PAGER = PagerOptions(device="cpu", handle_bytes=2 * MiB, host_copy=False)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("exchange")
    # Two models of different sizes (about 17 and 9 MiB of float32 weights).
    big = make_demo(root / "big", DemoSpec(layers=4, hidden=448, heads=7, kv_heads=1, seed=3))
    small = make_demo(root / "small", DemoSpec(layers=3, hidden=320, heads=5, kv_heads=1, seed=4))
    return big, small


@pytest.fixture
def pair(model_dirs: tuple[Path, Path]):
    """(big, small): big resident with no host copy, small suspended to its host copy."""
    big = PagedRuntime.load(model_dirs[0], OPTIONS, PAGER)
    small = PagedRuntime.load(model_dirs[1], OPTIONS, PAGER)
    small.suspend(SuspendLevel.HOST)
    yield big, small
    big.close()
    small.close()


def generate(rt: PagedRuntime, params: SamplingParams, name: str) -> tuple[int, ...]:
    assert rt.engine.tokenizer is not None
    prompt = tuple(rt.engine.tokenizer.encode("Exchange the two models and"))
    stream = rt.loop.submit(GenerationRequest(name, prompt, params))
    return GenerationResult.collect(name, list(stream)).token_ids


def footprint(rt: PagedRuntime) -> tuple[int, int]:
    """(arena bytes when resident, weight bytes of its host copy)."""
    arenas = sum(a.nbytes for a in rt.placement.arenas.values())
    return arenas, rt.engine.memory.weights.nbytes


class Books:
    """Samples both runtimes' real holdings (mapped arena handles, held host pages) while an
    exchange runs, and keeps the peaks."""

    def __init__(self, *runtimes: PagedRuntime) -> None:
        self.runtimes = runtimes
        self.peak_device = 0
        self.peak_host = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.peak_device = max(
            self.peak_device, sum(rt.placement.mapped_bytes() for rt in self.runtimes)
        )
        self.peak_host = max(self.peak_host, sum(rt.host_copy.nbytes for rt in self.runtimes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.0002)

    def __enter__(self) -> Books:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run_exchange(
    out: PagedRuntime,
    into: PagedRuntime,
    board_path: Path,
    host_slack: int,
    gpu_slack: int,
    inject_out: Callable[[int], None] | None = None,
    inject_in: Callable[[int], None] | None = None,
) -> dict[Side, BaseException | None]:
    """Both sides at once, as two workers would; the error each side raised (or None)."""
    board = Board.create(board_path, host_slack, gpu_slack)
    errors: dict[Side, BaseException | None] = {Side.OUT: None, Side.IN: None}

    def side(rt: PagedRuntime, s: Side, inject: Callable[[int], None] | None) -> None:
        peer = Board.open(board_path)
        try:
            rt.exchange(s, peer, TIMEOUT_S, inject)
        except BaseException as exc:  # reported to the test
            errors[s] = exc
        finally:
            peer.close()

    threads = [
        threading.Thread(target=side, args=(out, Side.OUT, inject_out)),
        threading.Thread(target=side, args=(into, Side.IN, inject_in)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    board.close()
    board_path.unlink()
    return errors


def budgets(a: PagedRuntime, b: PagedRuntime) -> tuple[int, int]:
    """(device budget, host budget): one copy of the larger of the two each, plus one handle
    of host room for the exchange to turn over."""
    (arena_a, weights_a), (arena_b, weights_b) = footprint(a), footprint(b)
    return max(arena_a, arena_b), max(weights_a, weights_b) + PAGER.handle_bytes


def exchange_within(
    out: PagedRuntime, into: PagedRuntime, board_path: Path, **injects
) -> tuple[dict[Side, BaseException | None], Books]:
    """An exchange whose slack is what the budgets leave free now, as torpord grants it."""
    device_budget, host_budget = budgets(out, into)
    device_used = out.placement.mapped_bytes() + into.placement.mapped_bytes()
    host_used = out.host_copy.nbytes + into.host_copy.nbytes
    with Books(out, into) as books:
        errors = run_exchange(
            out, into, board_path, host_budget - host_used, device_budget - device_used, **injects
        )
    assert books.peak_device <= device_budget
    assert books.peak_host <= host_budget
    return errors, books


def test_many_exchanges_keep_tokens_and_budgets(pair, tmp_path: Path) -> None:
    big, small = pair
    small.resume()
    want = {
        "small": (generate(small, GREEDY, "g"), generate(small, SAMPLED, "s")),
    }
    small.suspend(SuspendLevel.HOST)
    want["big"] = (generate(big, GREEDY, "g"), generate(big, SAMPLED, "s"))

    resident, waiting = big, small
    names = {id(big): "big", id(small): "small"}
    for n in range(8):
        errors, _ = exchange_within(resident, waiting, tmp_path / f"b{n}")
        assert errors == {Side.OUT: None, Side.IN: None}
        resident, waiting = waiting, resident
        assert resident.residency is PagedState.RESIDENT
        assert waiting.residency is PagedState.SUSPENDED_HOST
        assert waiting.host_copy.buffer is not None and waiting.host_copy.buffer.whole
        assert resident.host_copy.nbytes == 0  # host RAM holds the one copy only
        assert resident.placement.mapped_bytes() == footprint(resident)[0]
        assert waiting.placement.mapped_bytes() == 0
        name = names[id(resident)]
        got = (generate(resident, GREEDY, f"g{n}"), generate(resident, SAMPLED, f"s{n}"))
        assert got == want[name], f"exchange {n}: {name} changed its tokens"


def test_the_host_pages_really_go_back(pair, tmp_path: Path) -> None:
    """The kernel's own accounting: after big goes out and small comes in, the private host
    memory has grown by big's weights and shrunk by small's, not grown by both."""
    big, small = pair
    _, weights_big = footprint(big)
    _, weights_small = footprint(small)
    anon = procfs.rss_anon()
    errors, _ = exchange_within(big, small, tmp_path / "b")
    assert errors == {Side.OUT: None, Side.IN: None}
    grown = procfs.rss_anon() - anon
    assert grown <= weights_big - weights_small + 4 * MiB  # the allocator's noise
    assert grown >= weights_big - weights_small - 4 * MiB


class Boom(RuntimeError):
    pass


def _fail_at(step: int) -> Callable[[int], None]:
    def inject(n: int) -> None:
        if n == step:
            raise Boom(f"injected at step {n}")

    return inject


@pytest.mark.parametrize("failing", [Side.OUT, Side.IN])
def test_a_failure_at_every_chunk_leaves_both_usable(pair, tmp_path: Path, failing: Side) -> None:
    """Fail one side before each of its copies in turn; the exchange run back the other way
    (its rollback) leaves both whole and serving the same tokens."""
    big, small = pair
    want_big = generate(big, GREEDY, "g")
    small.resume()
    want_small = generate(small, GREEDY, "g")
    small.suspend(SuspendLevel.HOST)
    steps = len(big.placement.arenas["weights"].handle_extents())
    if failing is Side.IN:
        steps = len(small.placement.arenas["weights"].handle_extents())
    for step in range(steps):
        inject = _fail_at(step)
        errors, _ = exchange_within(
            big,
            small,
            tmp_path / f"f{step}",
            inject_out=inject if failing is Side.OUT else None,
            inject_in=inject if failing is Side.IN else None,
        )
        assert isinstance(errors[failing], Boom)
        peer = Side.IN if failing is Side.OUT else Side.OUT
        assert errors[peer] is None or isinstance(errors[peer], Aborted | TorporError)
        # The rollback: the same exchange the other way round, within the same budgets.
        errors, _ = exchange_within(small, big, tmp_path / f"r{step}")
        assert errors == {Side.OUT: None, Side.IN: None}, step
        assert big.residency is PagedState.RESIDENT
        assert small.residency is PagedState.SUSPENDED_HOST
        assert generate(big, GREEDY, f"g{step}") == want_big, step
    small.resume()
    assert generate(small, GREEDY, "after") == want_small


def test_a_busy_or_misplaced_runtime_is_refused_and_the_peer_stops(pair, tmp_path: Path) -> None:
    big, small = pair
    # IN on a resident runtime: nothing to do (the rollback of a side that never moved).
    board = Board.create(tmp_path / "b", PAGER.handle_bytes, 0)
    assert big.exchange(Side.IN, board, TIMEOUT_S).steps == 0
    assert board.status(Side.IN) is Status.DONE
    board.close()
    # OUT on a runtime suspended to disk: refused at once, marked failed on the board.
    from torpor.store.chunks import ChunkStore

    small.suspend(SuspendLevel.DISK, store=ChunkStore(tmp_path / "store"))
    board = Board.create(tmp_path / "d", PAGER.handle_bytes, 0)
    with pytest.raises(FailedPrecondition) as info:
        small.exchange(Side.OUT, board, TIMEOUT_S)
    assert info.value.reason == "BAD_RUNTIME_STATE"
    assert board.status(Side.OUT) is Status.FAILED
    board.close()
    # A runtime serving a request is not taken out.
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    assert big.engine.tokenizer is not None
    stream = big.loop.submit(GenerationRequest("busy", (1, 2, 3), long))
    board = Board.create(tmp_path / "c", PAGER.handle_bytes, 0)
    with pytest.raises(FailedPrecondition) as info:
        big.exchange(Side.OUT, board, TIMEOUT_S)
    assert info.value.reason == "RUNTIME_BUSY"
    assert big.residency is PagedState.RESIDENT
    list(stream)
    board.close()


def test_no_room_ends_in_a_deadline_not_a_hang(pair, tmp_path: Path) -> None:
    """With no slack the outgoing side can take no host page and the incoming side no device
    byte beyond the scratch arenas: both stop within the timeout, and the rollback works."""
    big, small = pair
    board = Board.create(tmp_path / "b", 0, 0)
    errors: dict[Side, BaseException | None] = {}

    def side(rt: PagedRuntime, s: Side) -> None:
        try:
            rt.exchange(s, Board.open(tmp_path / "b"), 1.0)
            errors[s] = None
        except TorporError as exc:
            errors[s] = exc

    start = time.monotonic()
    threads = [
        threading.Thread(target=side, args=(big, Side.OUT)),
        threading.Thread(target=side, args=(small, Side.IN)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - start < 5
    reasons = {s: getattr(e, "reason", None) for s, e in errors.items()}
    assert "EXCHANGE_TIMEOUT" in reasons.values() or "EXCHANGE_NO_ROOM" in reasons.values()
    board.close()
    errors2, _ = exchange_within(small, big, tmp_path / "r")
    assert errors2 == {Side.OUT: None, Side.IN: None}
    assert big.residency is PagedState.RESIDENT


def test_exchanges_with_a_keeper_and_page_locks(
    model_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the GPU's keeper (a real keeper process on the CPU backend) and a backend that
    records page locks as the CUDA one makes them: the incoming runtime's keeper lets go of
    its copy (else the keeper's lock would keep the freed pages), the outgoing runtime's new
    copy is a memfd handed to the keeper once whole, no page stays locked where its bytes
    were given back, and the tokens survive."""
    import dataclasses

    from torpor.keeper import KeeperProcess, hello
    from torpor.worker.pager.cpu import CpuBackend
    from torpor.worker.pager.stream import DeviceDrainer, HostStager

    locked: dict[int, int] = {}
    monkeypatch.setattr(
        CpuBackend, "pin_host", lambda _, a, n: locked.__setitem__(a, n), raising=False
    )
    staged = {"drain": 0, "stage": 0}
    for cls, key in ((DeviceDrainer, "drain"), (HostStager, "stage")):
        original = cls.__call__

        def counted(self, *args, _original=original, _key=key):  # type: ignore[no-untyped-def]
            staged[_key] += 1
            return _original(self, *args)

        monkeypatch.setattr(cls, "__call__", counted)
    monkeypatch.setattr(CpuBackend, "unpin_host", lambda _, a: locked.pop(a), raising=False)
    keeper = KeeperProcess(tmp_path / "k.sock", "cpu").start()
    try:
        options = dataclasses.replace(PAGER, keeper_socket=str(keeper.path))
        big = PagedRuntime.load(model_dirs[0], OPTIONS, options)
        small = PagedRuntime.load(model_dirs[1], OPTIONS, options)
        want = {"big": generate(big, GREEDY, "g"), "small": generate(small, GREEDY, "g")}
        small.suspend(SuspendLevel.HOST)  # makes its copy now, and hands it to the keeper
        assert _wait(lambda: small.host_copy.kept)
        names = {id(big): "big", id(small): "small"}
        resident, waiting = big, small
        for n in range(4):
            errors, _ = exchange_within(resident, waiting, tmp_path / f"k{n}")
            assert errors == {Side.OUT: None, Side.IN: None}, n
            resident, waiting = waiting, resident
            buffer = waiting.host_copy.buffer
            assert buffer is not None and buffer.shared and buffer.whole
            assert _wait(lambda: waiting.host_copy.kept)  # noqa: B023 (checked at once)
            # The keeper holds the one copy: the outgoing runtime's, not the freed one.
            assert _wait(
                lambda: int(hello(keeper.path)["held_bytes"]) == buffer.nbytes  # noqa: B023
            )
            assert resident.host_copy.buffer is None
            # Its new pages were copied through staging buffers unlocked, and are locked in the
            # background after: then the waiting runtime's whole copy is locked, and nothing
            # of the freed one or of the staging rings.
            assert _wait(lambda: buffer.pinned)  # noqa: B023
            assert sum(locked.values()) == buffer.pinned_bytes
            assert generate(resident, GREEDY, f"g{n}") == want[names[id(resident)]], n
        assert staged["drain"] > 0  # every copy out went through the staging buffers
        # A copy that is not locked (here: none of it) comes in through staging buffers.
        waiting.host_copy.unpin()
        before = staged["stage"]
        errors, _ = exchange_within(resident, waiting, tmp_path / "unlocked")
        assert errors == {Side.OUT: None, Side.IN: None}
        assert staged["stage"] >= before + len(waiting.placement.arenas["weights"].handle_extents())
        assert generate(waiting, GREEDY, "unlocked") == want[names[id(waiting)]]
        big.close()
        small.close()
    finally:
        keeper.stop()


def _wait(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()
