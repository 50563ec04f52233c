"""Model names and checkpoint paths from users are checked before anything uses them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor.errors import InvalidArgument
from torpor.store.names import check_source_path, validate_model_name


@pytest.mark.parametrize(
    "name",
    ["llama3", "Llama-3.1-70B-Instruct", "qwen2:72b", "m_1.fp8", "a", "9" * 128],
)
def test_good_names_are_accepted(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("../etc/passwd", "path separator"),
        ("..", "starts with a dot"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("a\x7fb", "control"),
        (".hidden", "starts with a dot"),
        ("a..b", "'..'"),
        ("-flag", "outside"),
        (":tag", "outside"),
        ("a b", "outside"),
        ("mödel", "outside"),
        ("x" * 129, "longer than"),
        (None, "must be a string"),
        (b"bytes", "must be a string"),
    ],
)
def test_bad_names_are_invalid_argument(name: object, problem: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_model_name(name)
    assert err.value.reason == "INVALID_MODEL_NAME"
    assert problem in err.value.metadata["problem"]


def test_source_under_a_root_is_resolved(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "llama").mkdir(parents=True)
    assert check_source_path(root / "llama" / ".." / "llama", [root]) == (root / "llama").resolve()


def test_symlink_escaping_the_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "models"
    outside = tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(InvalidArgument) as err:
        check_source_path(root / "link", [root])
    assert err.value.reason == "SOURCE_OUTSIDE_ROOTS"


def test_dotdot_out_of_the_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (tmp_path / "other").mkdir()
    with pytest.raises(InvalidArgument) as err:
        check_source_path(f"{root}/../other", [root])
    assert err.value.reason == "SOURCE_OUTSIDE_ROOTS"


def test_root_that_is_a_symlink_still_works(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "m").mkdir(parents=True)
    os.symlink(real, tmp_path / "models")
    assert check_source_path(tmp_path / "models" / "m", [tmp_path / "models"]) == real / "m"


@pytest.mark.parametrize(
    ("source", "roots", "reason"),
    [
        ("/nonexistent/torpor/model", ["/"], "SOURCE_MISSING"),
        ("/tmp", [], "NO_MODEL_ROOTS"),
        ("", ["/"], "INVALID_SOURCE_PATH"),
        ("/tmp/a\x00b", ["/"], "INVALID_SOURCE_PATH"),
    ],
)
def test_unusable_sources(source: str, roots: list[str], reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_source_path(source, [Path(r) for r in roots])
    assert err.value.reason == reason
