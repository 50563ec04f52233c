"""The one safe-open helper for checkpoint files (torpor.checkpoint_files), and torpord's
checkpoint-read threads (torpor.scheduler.checkpoints)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from torpor.checkpoint_files import CheckpointDir, as_checkpoint
from torpor.errors import DeadlineExceeded, InvalidArgument, Unavailable
from torpor.scheduler.checkpoints import CheckpointReader


@pytest.fixture
def tree(tmp_path: Path) -> tuple[CheckpointDir, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    (root / "model" / "config.json").write_text('{"a": 1}')
    (root / "blob").write_text('{"b": 2}')
    (outside / "secret").write_text('{"secret": true}')
    return CheckpointDir.confined(root / "model", [root]), outside


def test_reads_a_plain_file(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, _ = tree
    assert ckpt.read_json_object("config.json") == {"a": 1}
    assert ckpt.exists("config.json") and not ckpt.exists("absent.json")


def test_symlink_inside_the_roots_is_followed(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, _ = tree
    (ckpt.path / "linked.json").symlink_to(ckpt.path.parent / "blob")
    assert ckpt.read_json_object("linked.json") == {"b": 2}


def test_symlink_out_of_the_roots_is_refused(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, outside = tree
    (ckpt.path / "secret.json").symlink_to(outside / "secret")
    with pytest.raises(InvalidArgument, match="outside the model roots") as err:
        ckpt.read_bytes("secret.json")
    assert err.value.reason == "CHECKPOINT_FILE_OUTSIDE_ROOTS"
    assert err.value.metadata["file"] == "secret.json"


@pytest.mark.parametrize("name", ["../blob", "/etc/passwd", "..", ".", "", "a\x00b"])
def test_names_that_are_not_plain_file_names_are_refused(
    tree: tuple[CheckpointDir, Path], name: str
) -> None:
    ckpt, _ = tree
    with pytest.raises(InvalidArgument, match="plain file name"):
        ckpt.read_bytes(name)


def test_fifo_is_refused_without_blocking(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, _ = tree
    os.mkfifo(ckpt.path / "fifo.json")
    with pytest.raises(InvalidArgument, match="not a regular file \\(a FIFO\\)"):
        ckpt.read_bytes("fifo.json")


def test_device_and_directory_are_refused(tmp_path: Path) -> None:
    ckpt = CheckpointDir.confined(tmp_path, ["/"])
    (tmp_path / "null").symlink_to("/dev/null")
    (tmp_path / "sub").mkdir()
    with pytest.raises(InvalidArgument, match="character device"):
        ckpt.read_bytes("null")
    with pytest.raises(InvalidArgument, match="a directory"):
        ckpt.read_bytes("sub")


def test_file_swapped_after_the_check_is_refused_at_open(
    tree: tuple[CheckpointDir, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the after-open check closes: resolve() saw a file under the roots, then the
    path became a symlink out of them before the open. O_NOFOLLOW refuses the link."""
    ckpt, outside = tree
    real_resolve = CheckpointDir.resolve

    def resolve_then_swap(self: CheckpointDir, name: str) -> Path | None:
        found = real_resolve(self, name)
        (self.path / name).unlink()
        (self.path / name).symlink_to(outside / "secret")
        return found

    monkeypatch.setattr(CheckpointDir, "resolve", resolve_then_swap)
    with pytest.raises(InvalidArgument, match="cannot be opened"):
        ckpt.read_bytes("config.json")


def test_oversized_and_non_object_json_are_refused(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, _ = tree
    (ckpt.path / "list.json").write_text("[1]")
    with pytest.raises(InvalidArgument, match="JSON object, not list"):
        ckpt.read_json_object("list.json")
    with pytest.raises(InvalidArgument, match="more than the 4 allowed"):
        ckpt.read_bytes("config.json", limit=4)


def test_shard_index_names_are_checked(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, outside = tree
    (ckpt.path / "a.safetensors").write_bytes(b"")
    index = ckpt.path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}))
    assert ckpt.shard_names() == ["a.safetensors"]
    for bad in ("../../outside/secret", str(outside / "secret")):
        index.write_text(json.dumps({"weight_map": {"x": bad}}))
        with pytest.raises(InvalidArgument, match=r"model\.safetensors\.index\.json"):
            ckpt.shard_names()
    index.write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    with pytest.raises(InvalidArgument, match="weight_map"):
        ckpt.shard_names()


def test_directory_swapped_for_a_symlink_is_refused(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, outside = tree
    ckpt.path.rename(ckpt.path.with_name("orig"))
    ckpt.path.symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="outside the model roots"):
        ckpt.check_dir()
    with pytest.raises(InvalidArgument, match="outside the model roots"):
        ckpt.read_bytes("secret")


def test_a_bare_path_is_confined_to_itself(tree: tuple[CheckpointDir, Path]) -> None:
    ckpt, _ = tree
    (ckpt.path / "up.json").symlink_to(ckpt.path.parent / "blob")
    with pytest.raises(InvalidArgument, match="outside"):
        as_checkpoint(ckpt.path).read_bytes("up.json")
    with pytest.raises(InvalidArgument, match="no model roots"):
        CheckpointDir.confined(ckpt.path, [])


def test_reader_queues_a_burst_beyond_its_threads() -> None:
    reader = CheckpointReader(limit=2, timeout_s=10)

    async def main() -> None:
        results = await asyncio.gather(*(reader.run("m", lambda i=i: i) for i in range(20)))
        assert results == list(range(20))

    asyncio.run(main())


def test_reader_returns_results_and_errors() -> None:
    reader = CheckpointReader(limit=2, timeout_s=5)

    def boom() -> None:
        raise InvalidArgument("bad checkpoint")

    async def main() -> None:
        assert await reader.run("m", lambda x: x + 1, 1) == 2
        with pytest.raises(InvalidArgument, match="bad checkpoint"):
            await reader.run("m", boom)

    asyncio.run(main())


def test_reader_times_out_and_bounds_its_threads() -> None:
    """A read that never ends costs its caller `timeout_s` and holds its slot; with every
    slot held, the next read waits for one until its own timeout, then is refused."""
    reader = CheckpointReader(limit=1, timeout_s=0.2)
    release = threading.Event()

    async def main() -> None:
        with pytest.raises(DeadlineExceeded, match="took longer"):
            await reader.run("stuck", release.wait)
        with pytest.raises(Unavailable, match="still running"):
            await reader.run("next", lambda: None)
        release.set()
        assert await reader.run("after", lambda: 7) == 7  # the slot came back

    asyncio.run(main())
