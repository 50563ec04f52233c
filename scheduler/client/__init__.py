"""The `torpor` CLI's client of torpord (issue 6): typed gRPC calls over the daemon's Unix
socket or TCP, rendered as rich tables, progress bars or JSON.

    torpor [--socket PATH | --address HOST:PORT [--token-file F] [--tls-ca F]] [--timeout S]
           [--json] COMMAND ...

Commands (RPC): `ps` (Admin.ListResidency), `status` (Admin.GetStatus and the standard
health service), `models` (ListModels, GetModel), `register`, `unregister`, `generate`,
`acquire` (Acquire, Renew, Release), `evict`, `pin` / `unpin` (SetPinned), `prefetch`,
`explain`, `events` (WatchEvents), `snapshots ls|rm|gc` (ListSnapshots, DeleteSnapshot,
CollectGarbage); `token new` makes a bearer token for TCP and talks to no daemon.
`torpor COMMAND --help` lists each one's flags.

Every command that prints data takes `--json` (before or after the command name); shapes.py
gives the shapes and exits.py the exit statuses. Nothing here imports torch: `torpor ps`
starts in a fraction of a second.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the global options and the client commands to the `torpor` app."""
    from torpor.scheduler.client import commands, event_watch, generation, streams, tokens

    app.callback()(commands.global_options)
    for function in (
        commands.ps,
        commands.status,
        commands.models,
        commands.register,
        commands.unregister,
        generation.generate,
        streams.acquire,
        streams.evict,
        commands.pin,
        commands.unpin,
        streams.prefetch,
        commands.explain,
        event_watch.events,
    ):
        app.command(function.__name__)(function)
    app.add_typer(commands.snapshots_app)
    app.add_typer(tokens.token_app)
