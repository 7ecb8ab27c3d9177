"""What every command line command shares: where results and chatter go, byte progress bars,
and the parser's building blocks (groups, commands, list / get)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from tailor_client.client import Client
from tailor_client.display import resource_fields, resource_table
from tailor_client.errors import TailorError
from tailor_client.resources import Collection, Labelled, Runs
from tailor_client.uploads import ProgressFn

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 3, 130

# A command: (client, parsed arguments, output) -> exit status.
Command = Callable[[Client, argparse.Namespace, "Output"], int]


class Output:
    """Where a command's result and its chatter go."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    def result(self, value: Any, render: Callable[[Any], Any] = resource_fields) -> None:
        if self.as_json:
            print(json.dumps(value, indent=2))
        else:
            self.out.print(render(value))

    def rows(self, kind: str, rows: Iterable[Mapping[str, Any]], total: int | None) -> None:
        rows = list(rows)
        if self.as_json:
            print(json.dumps(rows, indent=2))
        else:
            self.out.print(resource_table(kind, rows, total, self.out.width))

    def transfer(self, verb: str) -> Transfer:
        return Transfer(self.err, verb)


class Transfer:
    """A bytes bar for an upload or download (a ProgressFn)."""

    def __init__(self, console: Console, verb: str) -> None:
        self.progress = Progress(TextColumn(verb), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=console, transient=True)
        self.task = self.progress.add_task(verb, total=None)

    def __enter__(self) -> ProgressFn | None:
        if not self.progress.console.is_terminal:
            return None  # a bar that is only erased again is noise in a log
        self.progress.start()
        return lambda done, total: self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def list_command(kind: str, collection: Callable[[Client], Collection[Any]]) -> Command:
    def run(client: Client, args: argparse.Namespace, output: Output) -> int:
        source = collection(client)
        # --name and --metadata filters, where the collection has them.
        filters = {k: getattr(args, k) for k in ("name", "metadata") if hasattr(args, k)}
        if "metadata" in filters:
            filters["metadata"] = pairs(filters["metadata"])
        if args.all:
            output.rows(kind, source.iter(**filters), None)
        else:
            page = source.list(offset=args.offset, limit=args.limit, **filters)
            output.rows(kind, page["data"], page["count"])
        return EXIT_OK
    return run


def pairs(values: list[str] | None) -> dict[str, str] | None:
    """`--metadata key=value` options as a dict (None when none were given)."""
    if values is None:
        return None
    found: dict[str, str] = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not equals or not key:
            raise TailorError(f"--metadata {value!r}: expected KEY=VALUE")
        found[key] = text
    return found


def delete_command(collection: Callable[[Client], Any], noun: str) -> Command:
    def run(client: Client, args: argparse.Namespace, output: Output) -> int:
        collection(client).delete(args.id)
        output.err.print(f"deleted {noun} {args.id}")
        return EXIT_OK
    return run


def update_command(collection: Callable[[Client], Labelled[Any]]) -> Command:
    def run(client: Client, args: argparse.Namespace, output: Output) -> int:
        changes: dict[str, Any] = {}
        if args.name is not None or args.clear_name:
            changes["name"] = None if args.clear_name else args.name
        if args.metadata is not None or args.clear_metadata:
            changes["metadata"] = {} if args.clear_metadata else pairs(args.metadata)
        if not changes:
            raise TailorError("update: give --name, --metadata, --clear-name or "
                              "--clear-metadata")
        output.result(collection(client).update(args.id, **changes))
        return EXIT_OK
    return run


def get_command(collection: Callable[[Client], Collection[Any]]) -> Command:
    def run(client: Client, args: argparse.Namespace, output: Output) -> int:
        output.result(collection(client).get(args.id))
        return EXIT_OK
    return run


def ended(job: Any, output: Output, summary: Callable[[Any], Any]) -> int:
    """The exit status for a followed job, after its one-line summary (None: the user left
    it running)."""
    if job is None:
        return EXIT_INTERRUPTED
    output.err.print(summary(job))
    if output.as_json:
        output.result(job)
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(job["status"], EXIT_ERROR)


def events_command(runs: Callable[[Client], Runs[Any]]) -> Command:
    """A job's events, oldest first, one a line (JSON lines with --json); --follow keeps
    printing until the job ends."""

    def run(client: Client, args: argparse.Namespace, output: Output) -> int:
        def show(event: Mapping[str, Any]) -> None:
            if output.as_json:
                print(json.dumps(event))
            else:
                when = event["created_at"][11:19]
                output.out.print(f"{event['id']:>6} {when} {event['kind']:<8} "
                                 f"{event.get('stage') or '':<9} {event['message']}",
                                 markup=False)

        source = runs(client)
        if args.follow:
            for _, events in source.watch(args.id, after=args.after):
                for event in events:
                    show(event)
        else:
            for event in source.iter_events(args.id, after=args.after):
                show(event)
        return EXIT_OK
    return run


def common_options() -> argparse.ArgumentParser:
    # SUPPRESS: an option given after the command does not reset one given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--base-url", help="API address (env TAILOR_BASE_URL)")
    common.add_argument("--api-key", help="API key tlr_... (env TAILOR_API_KEY)")
    common.add_argument("--json", action="store_true", help="print results as JSON")
    return common


class Parser:
    """The command line's parser, built a group and a command at a time."""

    def __init__(self, prog: str, description: str) -> None:
        self.common = common_options()
        self.parser = argparse.ArgumentParser(prog=prog, parents=[self.common],
                                              description=description)
        self.groups = self.parser.add_subparsers(dest="group", required=True,
                                                 metavar="COMMAND")

    def group(self, name: str, help: str) -> Any:
        sub = self.groups.add_parser(name, help=help, parents=[self.common])
        return sub.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def top(self, name: str, run: Command, help: str) -> argparse.ArgumentParser:
        """A command without a group (`embed`, `rerank`, `health`)."""
        sub = self.groups.add_parser(name, help=help, description=help, parents=[self.common])
        sub.set_defaults(run=run)
        return sub

    def command(self, subs: Any, name: str, run: Command, help: str
                ) -> argparse.ArgumentParser:
        sub = subs.add_parser(name, help=help, description=help, parents=[self.common])
        sub.set_defaults(run=run)
        return sub

    @staticmethod
    def paging(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--limit", type=int, default=20, help="items per page (max 100)")
        parser.add_argument("--offset", type=int, default=0, help="items to skip")
        parser.add_argument("--all", action="store_true", help="every item, page by page")

    def list_and_get(self, subs: Any, kind: str, pick: Callable[[Client], Collection[Any]],
                     noun: str) -> None:
        self.paging(self.command(subs, "list", list_command(kind, pick),
                                 f"list {noun}s, newest first"))
        article = "an" if noun[0].lower() in "aeiou" else "a"
        self.command(subs, "get", get_command(pick), f"read {article} {noun}").add_argument("id")

    def delete(self, subs: Any, pick: Callable[[Client], Any], noun: str) -> Any:
        sub = self.command(subs, "delete", delete_command(pick, noun), f"delete {noun}")
        sub.add_argument("id")
        return sub

    @staticmethod
    def metadata_option(parser: argparse.ArgumentParser, help: str) -> None:
        parser.add_argument("--metadata", action="append", metavar="KEY=VALUE", help=help)

    def labels(self, subs: Any, pick: Callable[[Client], Labelled[Any]], noun: str) -> None:
        """`list --name N --metadata K=V` filters and `update ID`, for labelled items."""
        listing = subs.choices["list"]
        listing.add_argument("--name", help=f"only {noun}s of this name")
        self.metadata_option(listing, "only those holding this pair (repeatable)")
        update = self.command(subs, "update", update_command(pick),
                              f"rename a {noun} or replace its metadata")
        update.add_argument("id")
        update.add_argument("--name", help="the new name")
        update.add_argument("--clear-name", action="store_true", help=argparse.SUPPRESS
                            if noun == "model" else "remove the name")
        self.metadata_option(update, "the new metadata, every pair (repeatable)")
        update.add_argument("--clear-metadata", action="store_true",
                            help="remove every pair")

    def events(self, subs: Any, pick: Callable[[Client], Runs[Any]]) -> None:
        events = self.command(subs, "events", events_command(pick),
                              "a job's events, oldest first")
        events.add_argument("id")
        events.add_argument("--after", type=int, help="only events with a larger id")
        events.add_argument("--follow", action="store_true", help="keep printing until it ends")
