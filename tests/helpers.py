"""Shared test helpers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def assert_eventually(
    probe: Callable[[], T],
    check: Callable[[T], bool],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
) -> T:
    """Poll `probe` until `check` accepts its value; fail with the last value at the deadline.
    (For state that another process changes; in-process waits use events.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s; last value: {value!r}")
        time.sleep(interval)
