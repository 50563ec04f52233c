"""The worker's config.json parsing refuses hostile values with INVALID_ARGUMENT naming the
field (issue 12's fuzz: num_attention_heads 0 was a ZeroDivisionError)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from torpor.errors import InvalidArgument
from torpor.worker.engine.model_config import ModelConfig


def _raw(demo_dir: Path, **changes: Any) -> dict[str, Any]:
    raw = json.loads((demo_dir / "config.json").read_text())
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_key_value_heads": -2}, "num_key_value_heads"),
        ({"num_key_value_heads": "2"}, "num_key_value_heads"),
        ({"head_dim": 1 << 40}, "head_dim"),
        ({"hidden_size": 2, "num_attention_heads": 4, "head_dim": None}, "head_dim"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"num_hidden_layers": 10**12}, "num_hidden_layers"),
        ({"rms_norm_eps": "tiny"}, "invalid value"),
        ({"architectures": 5}, "unsupported architecture"),
    ],
)
def test_bad_values_are_invalid_argument(
    demo_dir: Path, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument, match=field):
        ModelConfig.from_dict(_raw(demo_dir, **changes))


def test_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidArgument, match="JSON object"):
        ModelConfig.from_dir(tmp_path)


def test_absent_kv_heads_default_to_the_heads(demo_dir: Path) -> None:
    cfg = ModelConfig.from_dict(_raw(demo_dir, num_key_value_heads=None))
    assert cfg.num_kv_heads == cfg.num_heads
