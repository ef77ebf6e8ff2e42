"""``busd import conductor`` and ``busd export conductor``: conductor-loop bus files.

Import reads bus files (a directory is searched for ``*MESSAGE-BUS.md``) and
publishes every message, through the daemon when one runs, else as the
daemon-less pass does (:mod:`busd.routing.conductor`). It prints the counts
(``--json``: one object) and exits 0 when nothing was dead-lettered, else 65
(``invalid_message``: some input was refused; each refusal is in the DLQ).

Export appends to a conductor bus file, in conductor's exact format, the
journal's messages for a topic or an agent that the file does not hold yet
(re-running it appends nothing). It reads the journal directly, so it works
with the daemon running or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from busd.cli.common import (
    EXIT_CODES,
    ConfigOpt,
    DaemonCall,
    JsonOpt,
    RootOpt,
    daemon_or_files,
    exit_on_error,
    fail,
    load,
    print_json,
    remember_options,
)
from busd.core.model import TOPIC_PREFIX, check_agent_name
from busd.routing import conductor as bridge

__all__ = ["register"]

_PUBLISH_TIMEOUT_S = 120.0

_import_app = typer.Typer(
    name="import",
    help="Import messages from another system's files. Example: busd import conductor ./runs",
    no_args_is_help=True,
)
_export_app = typer.Typer(
    name="export",
    help="Write messages in another system's format. Example: busd export conductor B.md --topic t",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``import`` and ``export`` groups to ``app``."""
    app.add_typer(_import_app, name="import")
    app.add_typer(_export_app, name="export")


@_import_app.callback()
def _import_group(ctx: typer.Context, root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Import messages from another system's files."""
    remember_options(ctx, root, config)


@_export_app.callback()
def _export_group(ctx: typer.Context, root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Write messages in another system's format."""
    remember_options(ctx, root, config)


@_import_app.command("conductor")
def import_conductor(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Bus files, or directories to search.")],
    to: Annotated[
        str | None,
        typer.Option("--to", help="Recipient of the messages (agent or topic:<name>)."),
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Import conductor-loop bus files (*MESSAGE-BUS.md): every message once.

    Records conductor would drop, and messages busd refuses, are dead-lettered
    with their bytes, file and byte offset. Example: busd import conductor MESSAGE-BUS.md --to ops
    """
    cfg = load(ctx, root, config)
    recipient = to or cfg.default_recipient
    with exit_on_error():
        check_agent_name(recipient.removeprefix(TOPIC_PREFIX), "--to")
        files = bridge.find_bus_files(paths)
        items = [item for path in files for item in bridge.plan(cfg, path, to=recipient)]

        def live(call: DaemonCall) -> bridge.ImportReport:
            def publish(messages: list[Any]) -> list[dict[str, Any]]:
                params = {"messages": messages, "sender": "conductor-loop"}
                result = call("publish_batch", params, timeout=_PUBLISH_TIMEOUT_S)
                return list(result["results"])

            return bridge.run_live(cfg, items, publish)

        report = daemon_or_files(cfg, live, lambda: bridge.run_offline(cfg, items))
    report.files = [str(p) for p in files]
    if json_out:
        print_json(report)
    else:
        refused = sum(report.dead_lettered.values())
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dead_lettered.items()))
        typer.echo(
            f"{report.messages} messages in {len(files)} files: {report.imported} imported, "
            f"{report.duplicate} duplicate, {refused} dead-lettered" + (f" ({why})" if why else "")
        )
    if report.dead_lettered:
        raise typer.Exit(EXIT_CODES["invalid_message"])


@_export_app.command("conductor")
def export_conductor(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="The conductor bus file to append to.")],
    topic: Annotated[
        str | None, typer.Option("--topic", help="Export the messages sent to topic:<T>.")
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Export the messages for agent A.")
    ] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Append the journal's messages for a topic or an agent to a conductor bus file.

    In conductor's exact format (its ReadMessages reads every one back); messages
    the file already holds are skipped. Example: busd export conductor MESSAGE-BUS.md --topic ops
    """
    if (topic is None) == (agent is None):
        fail("usage", "give exactly one of --topic and --agent")
    cfg = load(ctx, root, config)
    with exit_on_error():
        if topic is not None:
            check_agent_name(topic.removeprefix(TOPIC_PREFIX), "topic")
            topic = topic.removeprefix(TOPIC_PREFIX)
        if agent is not None:
            check_agent_name(agent)
        messages = bridge.select(cfg, topic=topic, agent=agent)
        report = bridge.append_missing(Path(file), messages, fsync=cfg.fsync)
    if json_out:
        print_json(report)
    else:
        typer.echo(
            f"{report.selected} messages selected: {report.appended} appended to {report.file}, "
            f"{report.present} already there"
        )
