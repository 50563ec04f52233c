"""The CLI's one table of torpor.v1 enum names (`shapes.enum_name`, `shapes.enum_value`)
knows every enum the protocol defines, and every value of each, both ways (issue 13: a table
per boundary, every member through it)."""

from __future__ import annotations

from torpor.scheduler.client import shapes
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2, worker_pb2


def _enums() -> list:
    modules = (common_pb2, scheduler_pb2, admin_pb2, worker_pb2)
    return [getattr(m, name) for m in modules for name in m.DESCRIPTOR.enum_types_by_name]


def test_every_value_of_every_enum_has_a_name() -> None:
    enums = _enums()
    assert len(enums) >= 9
    for enum in enums:
        for name, value in enum.items():
            shown = shapes.enum_name(enum, value)
            if value == 0:
                assert shown is None, name  # UNSPECIFIED reads null
            else:
                assert shown is not None and name.lower().endswith(shown), (name, shown)
                assert enum.Value(shapes.enum_value(enum, shown)) == value  # and back
        assert shapes.enum_name(enum, 99) == "unknown_99"  # a newer daemon's value
