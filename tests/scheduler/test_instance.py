"""The instance lock (scheduler/instance.py): one holder per directory, the refusal names the
holder's pid, and the kernel frees the lock however the holder ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from torpor.errors import FailedPrecondition
from torpor.scheduler.instance import LOCK_NAME, InstanceLock, holder_pid, lock_directories

HOLD = """
import sys
from pathlib import Path
from torpor.scheduler.instance import InstanceLock
InstanceLock(Path(sys.argv[1]), "state directory").acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def hold_in_another_process(directory: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    holder = hold_in_another_process(tmp_path)
    try:
        assert holder_pid(tmp_path / LOCK_NAME) == holder.pid
        with pytest.raises(FailedPrecondition) as refused:
            InstanceLock(tmp_path, "state directory").acquire()
        assert refused.value.reason == "ALREADY_RUNNING"
        assert f"pid {holder.pid}" in str(refused.value)
        assert str(tmp_path) in str(refused.value) and "state directory" in str(refused.value)
        assert refused.value.metadata["pid"] == str(holder.pid)
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    lock = InstanceLock(tmp_path, "state directory")
    lock.acquire()
    lock.release()


def test_release_frees_the_lock_and_clears_the_pid(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path / "new" / "dir", "runtime directory")
    first.acquire()  # creates the directory
    assert first.held and holder_pid(first.path) is not None
    first.release()
    first.release()  # idempotent
    assert not first.held and holder_pid(first.path) is None
    second = InstanceLock(tmp_path / "new" / "dir", "runtime directory")
    second.acquire()
    second.release()


def test_one_directory_for_both_is_locked_once(tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(tmp_path)
    locks = lock_directories((tmp_path, "state directory"), (tmp_path / "alias", "runtime"))
    assert [lock.path for lock in locks] == [tmp_path / LOCK_NAME]
    for lock in locks:
        lock.release()


def test_a_refusal_releases_the_locks_already_taken(tmp_path: Path) -> None:
    holder = hold_in_another_process(tmp_path / "run")
    try:
        with pytest.raises(FailedPrecondition, match=f"pid {holder.pid}"):
            lock_directories((tmp_path / "state", "state directory"), (tmp_path / "run", "run"))
        # The state directory's lock was given back: another daemon could take it.
        lock = InstanceLock(tmp_path / "state", "state directory")
        lock.acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).mkdir()  # something in the lock file's place
    with pytest.raises(FailedPrecondition, match="cannot lock the state directory") as failed:
        InstanceLock(tmp_path, "state directory").acquire()
    assert failed.value.reason == "LOCK_FAILED"
