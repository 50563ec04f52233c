"""What the kernel says about this process: resident memory, open files, mappings.

The pager's tests assert that memory is really released, so they read the kernel's own
accounting rather than trusting the code under test.
"""

from __future__ import annotations

import os


def rss_shmem() -> int:
    """Resident shared-memory bytes (memfd pages mapped by this process count here)."""
    return _status_bytes("RssShmem")


def rss_anon() -> int:
    """Resident anonymous bytes (private memory such as a CPU host buffer)."""
    return _status_bytes("RssAnon")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise AssertionError(f"/proc/self/status has no {field}")


def open_fds() -> int:
    """The number of file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def mappings(start: int, end: int) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of every mapping that overlaps [start, end)."""
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo < end and hi > start:
                found.append((lo, hi, perms))
    return found


def is_reserved(address: int, nbytes: int) -> bool:
    """True when [address, address + nbytes) is fully covered by inaccessible mappings."""
    spans = mappings(address, address + nbytes)
    covered = sum(min(hi, address + nbytes) - max(lo, address) for lo, hi, _ in spans)
    return covered == nbytes and all(perms.startswith("---") for _, _, perms in spans)


def mapping_count() -> int:
    """The number of mappings (VMAs) of this process."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)
