"""Measure candidate chunk hashes on this machine (the figures behind docs/STORE.md).

    .venv/bin/python bench/hash_rate.py [--mib 256] [--repeat 5]

Hashes one buffer of random bytes (the size of a large chunk) several times with each
candidate and prints the best rate, single-threaded, as the chunk store uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import time
from collections.abc import Callable

import xxhash

CANDIDATES: dict[str, Callable[[memoryview], object]] = {
    "xxh3-128 (xxhash)": xxhash.xxh3_128_hexdigest,
    "xxh3-64 (xxhash)": xxhash.xxh3_64_hexdigest,
    "blake2b-256 (hashlib)": lambda b: hashlib.blake2b(b, digest_size=32).hexdigest(),
    "blake2b-128 (hashlib)": lambda b: hashlib.blake2b(b, digest_size=16).hexdigest(),
    "sha256 (hashlib)": lambda b: hashlib.sha256(b).hexdigest(),
}


def best_rate(fn: Callable[[memoryview], object], buf: memoryview, repeat: int) -> float:
    """Best-of-`repeat` throughput in bytes per second."""
    fn(buf[: 1 << 20])  # warm up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(buf)
        best = min(best, time.perf_counter() - start)
    return buf.nbytes / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="buffer size in MiB")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    buf = memoryview(os.urandom(args.mib << 20))
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, xxhash {xxhash.VERSION}, "
        f"buffer {args.mib} MiB, best of {args.repeat}"
    )
    for name, fn in CANDIDATES.items():
        rate = best_rate(fn, buf, args.repeat)
        print(f"{name:24s} {rate / 1e9:7.2f} GB/s")


if __name__ == "__main__":
    main()
