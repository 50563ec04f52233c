"""How big the reliability suites run: the one place that reads TORPOR_RELIABILITY_FULL.

`make test` runs the short forms (a few trials, about a hundred streams) so that CI stays
cheap; `make test-reliability` sets TORPOR_RELIABILITY_FULL=1 for the full forms that
docs/RELIABILITY.md reports. TORPOR_RELIABILITY_SEED replays a run: every suite prints the
seed it used.
"""

from __future__ import annotations

import os
import random

FULL = os.environ.get("TORPOR_RELIABILITY_FULL", "") == "1"
"""The full form (`make test-reliability`)."""


def pick(short: int, full: int) -> int:
    """`full` in the full form, `short` otherwise; an env override wins in either
    (TORPOR_RELIABILITY_TRIALS, TORPOR_RELIABILITY_STREAMS are read by the callers)."""
    return full if FULL else short


def trials_per_phase() -> int:
    """Kill trials per (phase, victim) of the faults suite: 1 in CI, 10 in the full run (so
    20 per phase: 10 worker kills and 10 torpord kills)."""
    return int(os.environ.get("TORPOR_RELIABILITY_TRIALS") or pick(1, 10))


def concurrent_streams() -> int:
    """Concurrent Generate streams per round of the load suite: ~100 in CI, 1,000 full."""
    return int(os.environ.get("TORPOR_RELIABILITY_STREAMS") or pick(100, 1000))


def load_rounds() -> int:
    """Rounds of the load suite (the first warms up; RSS and fds are compared after it)."""
    return int(os.environ.get("TORPOR_RELIABILITY_ROUNDS") or pick(2, 5))


def seeded(name: str) -> random.Random:
    """A Random for one test, seeded from TORPOR_RELIABILITY_SEED or fresh; the seed is
    printed (pytest shows it with a failure) so that the trial sequence can be replayed."""
    seed = int(os.environ.get("TORPOR_RELIABILITY_SEED") or random.SystemRandom().getrandbits(32))
    print(f"[reliability] {name}: TORPOR_RELIABILITY_SEED={seed}")
    return random.Random(f"{seed}:{name}")
