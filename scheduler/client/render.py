"""What the client commands print: rich tables for people, JSON for programs.

Every renderer takes the JSON shape of shapes.py, so the table and `--json` cannot disagree.
Tables go to stdout; on a pipe they are plain text, one line per row (wide enough not to
wrap), so `torpor ps | grep` works.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

from rich.console import Console, JustifyMethod, RenderableType
from rich.table import Table

from torpor.scheduler.client.shapes import Json, parse_time
from torpor.units import format_size

DASH = "-"
_PIPE_WIDTH = 240  # columns of a table written to a pipe, so that rows never wrap


@functools.cache
def console() -> Console:
    """The stdout console: the terminal's width on a terminal, wide and plain elsewhere."""
    tty = sys.stdout.isatty()
    return Console(
        highlight=False,
        markup=False,  # model names and event details are data, not rich markup
        emoji=False,
        soft_wrap=False,
        width=None if tty else _PIPE_WIDTH,
    )


def show(item: str | RenderableType = "") -> None:
    """Print a line of text as is, or a rich renderable (a table) through the console; on a
    pipe without the padding rich adds at the ends of lines."""
    if isinstance(item, str):
        sys.stdout.write(item + "\n")
        sys.stdout.flush()
        return
    out = console()
    if out.is_terminal:
        out.print(item)
        return
    with out.capture() as captured:
        out.print(item)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()


def print_json(doc: object) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def print_json_line(doc: object) -> None:
    """One JSON object on one line of stdout, flushed (JSON Lines, for streams)."""
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def size(n: int | None) -> str:
    return DASH if n is None else format_size(n)


def secs(s: float | None) -> str:
    if s is None:
        return DASH
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def relative(iso: str | None, now: datetime | None = None) -> str:
    """`3 min ago` or `in 40 s`; a dash when unset."""
    when = parse_time(iso)
    if when is None:
        return DASH
    delta = ((now or datetime.now(UTC)) - when).total_seconds()
    text = _span(abs(delta))
    return f"{text} ago" if delta >= 0 else f"in {text}"


def clock(iso: str | None) -> str:
    """An ISO-8601 time as local wall-clock time to the second: `2026-11-28 10:00:05`."""
    when = parse_time(iso)
    return DASH if when is None else when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _span(s: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= length:
            return f"{s / length:.0f} {unit}"
    return f"{s:.0f} s"


def _cell(value: object) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(title: str | None, columns: Iterable[str]) -> Table:
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for name in columns:
        justify: JustifyMethod = "right" if name in _NUMERIC else "left"
        table.add_column(name, justify=justify, no_wrap=True)
    return table


_NUMERIC = {"GPU", "GPU MEM", "HOST MEM", "DISK", "LEASES", "RESTORE", "PID", "SIZE",
            "UNIQUE", "CHUNKS", "FOOTPRINT", "BATCH", "SEQ LEN", "PRIORITY", "FREES", "SCORE",
            "TOTAL", "USED", "FREE", "INDEX"}  # fmt: skip
_RUNTIME_COLUMNS = ("MODEL", "STATE", "TIER", "GPU", "GPU MEM", "HOST MEM", "DISK", "LAST USED",
                    "LEASES", "PINNED", "KEEP-ALIVE UNTIL", "RESTORE", "PID")  # fmt: skip


def residency(
    doc: Json, budgets: Json | None = None, dummies: frozenset[str] = frozenset()
) -> None:
    """`torpor ps`: one table per GPU, the runtimes bound to no GPU, then the host-RAM and
    disk budgets. A runtime of a model in `dummies` (load_format dummy) is named
    `NAME (dummy)`."""
    now = datetime.now(UTC)
    doc = {
        **doc,
        "runtimes": [
            {**r, "model": f"{r['model']} (dummy)"} if r["model"] in dummies else r
            for r in doc["runtimes"]
        ],
    }
    for g in doc["gpus"]:
        title = (
            f"GPU {g['index']} · {g['name']} · {size(g['total_bytes'])} total, "
            f"{size(g['used_bytes'])} used, {size(g['free_bytes'])} free"
        )
        show(_runtime_table(title, [r for r in doc["runtimes"] if r["gpu"] == g["index"]], now))
        show()
    unbound = [r for r in doc["runtimes"] if r["gpu"] is None]
    if unbound:
        show(_runtime_table("No GPU (snapshot or cold)", unbound, now))
    elif not doc["gpus"]:
        show("no GPUs")
    budgets = budgets or {}
    lines = [
        _budget(label, budgets.get(key)) for key, label in (("host", "host RAM"), ("disk", "disk"))
    ]
    if any(lines):
        show()
        show("; ".join(line for line in lines if line))


def _budget(label: str, b: Json | None) -> str:
    if b is None:
        return ""
    used, total, free = (size(b[k]) for k in ("used_bytes", "total_bytes", "free_bytes"))
    return f"{label}: {used} used of {total}, {free} free"


def _runtime_table(title: str, runtimes: list[Json], now: datetime) -> Table:
    table = _table(title, _RUNTIME_COLUMNS)
    for r in runtimes:
        state = _cell(r["state"])
        if r["exchange_with"]:  # an exchange swap: the model it trades places with
            state += f" ⇄ {r['exchange_with']}"
        host = size(r["host_bytes"]) + (" (copy)" if r["host_copy"] else "")
        table.add_row(
            r["model"], state, _cell(r["tier"]), _cell(r["gpu"]),
            size(r["gpu_bytes"]), host, size(r["disk_bytes"]),
            relative(r["last_used"], now), str(r["leases"]), _cell(r["pinned"]),
            relative(r["keep_alive_until"], now), secs(r["restore_estimate_s"]),
            _cell(r["worker_pid"] or None),
        )  # fmt: skip
    if not runtimes:
        table.add_row("(no runtimes)", *[""] * (len(_RUNTIME_COLUMNS) - 1))
    return table


def models(docs: list[Json]) -> None:
    """`torpor models`."""
    columns = ("NAME", "STATE", "DTYPE", "WEIGHTS", "FOOTPRINT", "BATCH", "SEQ LEN", "PRIORITY",
               "PINNED", "KEEP-ALIVE", "SNAPSHOT", "SOURCE")  # fmt: skip
    table = _table(None, columns)
    for m in docs:
        table.add_row(
            m["name"], _cell(m["state"]), _cell(m["dtype"]), m["load_format"],
            size(m["footprint_bytes"] or None),
            str(m["max_batch"]), str(m["max_seq_len"]), str(m["priority"]), _cell(m["pinned"]),
            f"{m['keep_alive_s']} s" if m["keep_alive_s"] else DASH, _cell(m["snapshot_id"]),
            m["source"],
        )  # fmt: skip
    show(table if docs else "no models registered (torpor register NAME DIR)")


def model_line(verb: str, m: Json) -> None:
    """One line about one model: `registered demo-a: cold, float32, 96.0 MiB on a GPU`."""
    footprint = f", {size(m['footprint_bytes'])} on a GPU" if m["footprint_bytes"] else ""
    pinned = ", pinned" if m["pinned"] else ""
    dummy = ", dummy weights" if m["load_format"] == "dummy" else ""
    show(f"{verb} {m['name']}: {_cell(m['state'])}, {_cell(m['dtype'])}{dummy}{footprint}{pinned}")


def plan(doc: Json) -> None:
    """`torpor explain`: the decision, then the victims it would evict."""
    verdict = "admit" if doc["admit"] else "not admitted"
    show(f"{doc['model']}: {verdict}: {doc['reason']} ({doc['reason_code']})")
    facts = Table.grid(padding=(0, 2))
    facts.add_row("target GPU", _cell(doc["gpu"]))
    facts.add_row("restore from", _cell(doc["source_tier"]))
    facts.add_row("needs", size(doc["required_bytes"]))
    facts.add_row("estimate", secs(doc["estimate_s"]))
    facts.add_row("victims", str(len(doc["victims"])) if doc["victims"] else "none")
    show(facts)
    if doc["victims"]:
        table = _table(None, ("MODEL", "RUNTIME", "GPU", "TO", "FREES", "SCORE"))
        for v in doc["victims"]:
            to = _cell(v["to_tier"]) + (" (exchange)" if v["exchange"] else "")
            table.add_row(v["model"], v["runtime_id"], str(v["gpu"]), to,
                          size(v["bytes_freed"]), f"{v['score']:.4g}")  # fmt: skip
        show(table)


def status(doc: Json) -> None:
    """`torpor status`."""
    show(
        f"torpord {doc['version']} on {doc['hostname'] or '?'}: {doc['health']}, "
        f"{_cell(doc['backend'])} backend, up {_span(doc['uptime_s'] or 0)} "
        f"(since {clock(doc['started_at'])})"
    )
    show(f"{doc['models']} models registered, {doc['workers']} workers running")
    table = _table(None, ("INDEX", "NAME", "TOTAL", "USED", "FREE"))
    for g in doc["gpus"]:
        table.add_row(str(g["index"]), g["name"], size(g["total_bytes"]), size(g["used_bytes"]),
                      size(g["free_bytes"]))  # fmt: skip
    show(table if doc["gpus"] else "no GPUs")


def snapshots(docs: list[Json]) -> None:
    """`torpor snapshots ls`."""
    columns = ("ID", "MODEL", "STATE", "SIZE", "UNIQUE", "CHUNKS", "CREATED", "LAST USED")
    table = _table(None, columns)
    now = datetime.now(UTC)
    for s in docs:
        table.add_row(s["snapshot_id"], s["model"], _cell(s["state"]), size(s["bytes"]),
                      size(s["unique_bytes"]), str(s["chunks"]), relative(s["created_at"], now),
                      relative(s["last_used"], now))  # fmt: skip
    show(table if docs else "no snapshots")


def event_line(e: Json) -> str:
    """One event as one line: time, id, kind, model, GPU, detail."""
    where = f"gpu {e['gpu']}" if e["gpu"] is not None else DASH
    fields = (clock(e["time"]), f"#{e['id']}", e["kind"], e["model"] or DASH, where, e["detail"])
    return "  ".join(str(f) for f in fields)


def evicted_line(model: str, d: Json) -> str:
    aborted = f", {d['aborted_requests']} requests aborted" if d["aborted_requests"] else ""
    return (
        f"evicted {model} ({d['runtime_id']}): now {_cell(d['state'])}, "
        f"{size(d['gpu_bytes_freed'])} of GPU memory freed in {secs(d['elapsed_s'])}{aborted}"
    )
