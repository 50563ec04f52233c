"""Device bytes of a process as the driver reports them to an outside observer (nvidia-smi,
i.e. NVML in another process, which is how torpord sees workers).

Asked from outside on purpose: NVML called inside a process whose CUDA state is locked by
the driver's process checkpoint blocks until it is unlocked (seen on an H200, driver 580).
"""

from __future__ import annotations

import os
import subprocess


def process_gpu_bytes(pid: int | None = None, timeout_s: float = 20.0) -> int | None:
    """Bytes the process holds on any GPU (0 when it is not listed; None without nvidia-smi)."""
    pid = os.getpid() if pid is None else pid
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-compute-apps=pid,used_memory",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for line in out.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            total += int(fields[1]) << 20  # MiB
    return total
