"""`torpor events`: the residency event log (WatchEvents), one event per line.

Text prints `TIME  #ID  KIND  MODEL  GPU  DETAIL`; `--json` prints JSON Lines, one object per
event, flushed as it arrives (the stream may never end with --follow).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from torpor.errors import InvalidArgument
from torpor.scheduler.client import render, shapes
from torpor.scheduler.client.commands import JsonOption
from torpor.scheduler.client.exits import fail
from torpor.scheduler.client.session import session, wants_json
from torpor.v1 import admin_pb2

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO-8601 time (local time when it has no offset) or a span ago such as
    `90s`, `10m`, `2h`, `1d`."""
    match = _AGO.match(text)
    if match:
        ago = float(match.group(1)) * _UNIT_S[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=ago)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgument(
            f"--since must be an ISO-8601 time or a span such as 10m or 2h, got {text!r}",
            reason="BAD_SINCE",
        ) from None
    return when if when.tzinfo else when.astimezone()


def kind_value(name: str) -> str:
    """`state_changed` as "EVENT_KIND_STATE_CHANGED"."""
    try:
        return shapes.enum_value(admin_pb2.EventKind, name)
    except ValueError:
        known = [shapes.enum_name(admin_pb2.EventKind, v) for v in admin_pb2.EventKind.values()]
        raise InvalidArgument(
            f"--kind {name!r} is not an event kind; one of {', '.join(filter(None, known))}",
            reason="BAD_EVENT_KIND",
        ) from None


def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing live events (Ctrl-C ends).")
    ] = False,
    model: Annotated[str | None, typer.Option(help="Only events of this model.")] = None,
    gpu: Annotated[int | None, typer.Option(min=0, help="Only events on this GPU.")] = None,
    kind: Annotated[
        list[str] | None, typer.Option(help="Only this kind, e.g. state_changed (repeatable).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Start at this time (ISO-8601) or this long ago (10m).")
    ] = None,
    after_id: Annotated[
        int | None, typer.Option(min=0, help="Start after this event id (resume a stream).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Residency events: state changes, evictions, leases, snapshots.

    The whole log unless --since or --after-id; then live events with --follow.
    """
    as_json = wants_json(ctx, as_json)
    try:
        request = admin_pb2.WatchEventsRequest(
            kinds=[kind_value(k) for k in kind or []], model=model or "", follow=follow
        )
        if since is not None:
            request.since.FromDatetime(parse_since(since))
        else:
            request.after_id = after_id or 0  # 0: from the beginning of the log
    except InvalidArgument as err:
        fail(err)
    if gpu is not None:
        request.gpu = gpu
    with session(ctx) as conn:
        try:
            for event in conn.stream(conn.admin.WatchEvents, request, follow=follow):
                doc = shapes.event(event)
                if as_json:
                    render.print_json_line(doc)
                else:
                    render.show(render.event_line(doc))
        except KeyboardInterrupt:
            if not follow:
                raise  # interrupted before the replay was done
