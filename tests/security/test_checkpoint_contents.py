"""Hostile checkpoint contents are INVALID_ARGUMENT naming the file and field, never INTERNAL
with an exception's text (issue 12's fuzz findings: a safetensors header length of 2^63,
num_attention_heads 0, a config.json that is not an object). Real torpord over gRPC; one
torpord for the module, a fresh checkpoint directory per case."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import Torpord, TorporError, start_torpord
from tests.security.conftest import MAX_SEQ_LEN
from torpor.errors import Code


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contents-models")


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, module_root: Path) -> Iterator[Torpord]:
    d = start_torpord(tmp_path_factory.mktemp("contents-state"), module_root, memory=64 << 20)
    yield d
    assert d.stop() == 0


def _config(**changes: object) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        path = model / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return change


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda model: (model / name).write_bytes(data)


def _safetensors(header: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header


CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "header-2e63": (
        _write("model.safetensors", _safetensors(b"{}", 1 << 63)),
        ("model.safetensors", "header length"),
    ),
    "header-not-object": (
        _write("model.safetensors", _safetensors(b"[1, 2]")),
        ("model.safetensors",),
    ),
    "header-bad-shape": (
        _write(
            "model.safetensors",
            _safetensors(b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}'),
        ),
        ("model.safetensors", "shape"),
    ),
    "heads-0": (_config(num_attention_heads=0), ("config.json", "num_attention_heads")),
    "layers-negative": (_config(num_hidden_layers=-3), ("config.json", "num_hidden_layers")),
    "hidden-string": (_config(hidden_size="big"), ("config.json", "hidden_size")),
    "positions-absurd": (
        _config(max_position_embeddings=10**30),
        ("config.json", "max_position_embeddings"),
    ),
    "head-dim-0": (
        _config(hidden_size=2, num_attention_heads=4, head_dim=None),
        ("config.json", "head_dim"),
    ),
    "config-array": (_write("config.json", b"[1, 2, 3]"), ("config.json", "JSON object")),
    "config-not-json": (_write("config.json", b"{nope"), ("config.json", "JSON")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_invalid_argument(
    shared_daemon: Torpord, module_root: Path, demo_template: Path, case: str
) -> None:
    corrupt, words = CASES[case]
    model = module_root / case
    shutil.copytree(demo_template, model)
    corrupt(model)
    with pytest.raises(TorporError) as err:
        shared_daemon.register(case, model, max_seq_len=MAX_SEQ_LEN)
    assert err.value.code is Code.INVALID_ARGUMENT, err.value
    for word in words:
        assert word in err.value.message, err.value.message
