"""Model sources are confined (issue 12): no file outside the model roots is read by torpord
or its worker, whether through a symlinked file, a shard index, a directory swapped for a
symlink after registration, or a symlinked small file copied into a snapshot. Real torpord,
real worker, over gRPC."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.daemon.conftest import Torpord, TorporError, call
from tests.security.conftest import MAX_SEQ_LEN
from torpor.errors import Code
from torpor.v1 import admin_pb2, common_pb2


def _register(daemon: Torpord, name: str, source: Path) -> None:
    daemon.register(name, source, max_seq_len=MAX_SEQ_LEN)


def _refused(daemon: Torpord, name: str, source: Path) -> TorporError:
    with pytest.raises(TorporError) as err:
        _register(daemon, name, source)
    assert err.value.code is Code.INVALID_ARGUMENT, err.value
    return err.value


def test_symlinked_weights_out_of_the_roots_are_refused(
    daemon: Torpord, roots: tuple[Path, Path]
) -> None:
    root, outside = roots
    weights = root / "demo" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "demo" / "model.safetensors")
    err = _refused(daemon, "linked", root / "demo")
    assert "model.safetensors" in err.message and "outside the model roots" in err.message


def test_symlink_inside_the_roots_is_allowed(daemon: Torpord, roots: tuple[Path, Path]) -> None:
    """A Hugging Face cache links snapshots/<rev>/* to blobs/: fine while under a root."""
    root, _ = roots
    blobs = root / "blobs"
    blobs.mkdir()
    weights = root / "demo" / "model.safetensors"
    weights.rename(blobs / "weights")
    weights.symlink_to(blobs / "weights")
    _register(daemon, "cached", root / "demo")
    assert len(daemon.generate("cached", [1, 2, 3], max_tokens=2)) >= 1


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
def test_shard_index_naming_files_out_of_the_roots_is_refused(
    daemon: Torpord, roots: tuple[Path, Path], absolute: bool
) -> None:
    root, outside = roots
    model = root / "demo"
    # A real local shard too, so that only the index's names can be the reason to refuse.
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    target = outside / "demo" / "model.safetensors"
    name = str(target) if absolute else os.path.relpath(target, model)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": name}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _refused(daemon, "sharded", model)
    assert "model.safetensors.index.json" in err.message


def test_symlinked_generation_config_is_refused_at_registration(
    daemon: Torpord, roots: tuple[Path, Path]
) -> None:
    root, outside = roots
    secret = outside / "secret.json"
    secret.write_text('{"eos_token_id": 2}')
    gen = root / "demo" / "generation_config.json"
    gen.unlink()
    gen.symlink_to(secret)
    err = _refused(daemon, "gen", root / "demo")
    assert "generation_config.json" in err.message


def test_directory_swapped_for_a_symlink_after_registration_is_not_read(
    daemon: Torpord, roots: tuple[Path, Path]
) -> None:
    root, outside = roots
    _register(daemon, "swapped", root / "demo")
    (root / "demo").rename(root / "demo.orig")
    (root / "demo").symlink_to(outside / "demo", target_is_directory=True)
    # The worker would load the outside copy (it is a complete, valid checkpoint).
    with pytest.raises(TorporError) as err:
        daemon.generate("swapped", [1, 2, 3], max_tokens=2)
    # The load fails (torpord reports a model that failed to load as LOAD_FAILED, with the
    # worker's reason); on main it succeeded, reading the outside copy.
    assert "outside the model roots" in err.value.message, err.value


def test_symlinked_small_file_is_never_copied_into_the_snapshot_store(
    daemon: Torpord, roots: tuple[Path, Path]
) -> None:
    """A file turned into a symlink out of the roots after the load: the snapshot written at
    eviction to disk must not hold its bytes. It holds the files the runtime was loaded
    from, so the model restores from it and serves."""
    root, outside = roots
    _register(daemon, "snap", root / "demo")
    daemon.generate("snap", [1, 2, 3], max_tokens=2)
    marker = "torpor-confinement-marker-6f1d"
    secret = outside / "secret.json"
    secret.write_text(json.dumps({"eos_token_id": 2, "note": marker}))
    gen = root / "demo" / "generation_config.json"
    gen.unlink()
    gen.symlink_to(secret)
    evict = admin_pb2.EvictRequest(model="snap", to_tier=common_pb2.TIER_DISK)
    call(daemon.admin.Evict, evict, timeout=120)
    store = daemon.state_dir / "snapshots"
    leaked = [p for p in store.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    assert leaked == []
    assert daemon.runtime("snap").state == common_pb2.RUNTIME_STATE_SUSPENDED_DISK
    assert len(daemon.generate("snap", [1, 2, 3], max_tokens=2)) >= 1
