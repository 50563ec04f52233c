"""Shared test configuration: `gpu`-marked tests are skipped where torch sees no CUDA GPU."""

from __future__ import annotations

import os

import pytest

# Every torpord a test starts inherits this: the HTTP API's default port (8080) is the
# host's, and another torpord may hold it. Tests of the HTTP API give their daemon a port.
os.environ.setdefault("TORPOR_DAEMON_HTTP_LISTEN", "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    # TORPOR_TEST_INTERPRET=1 (with TRITON_INTERPRET=1) runs the Triton kernel tests on the CPU.
    if torch.cuda.is_available() or os.environ.get("TORPOR_TEST_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
