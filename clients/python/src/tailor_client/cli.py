"""`tailor-client`: the Tailor API from a terminal.

Results go to stdout (tables, or JSON with --json); progress bars, prompts and errors go to
stderr, so `tailor-client --json jobs get ID | jq` works. Exit status: 0 done, 1 an error (or a
job that failed), 2 a usage error, 3 a job that was cancelled, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
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
from tailor_client.display import (
    job_summary,
    report_view,
    resource_fields,
    resource_table,
)
from tailor_client.errors import APIConnectionError, APIError, TailorError
from tailor_client.resources import Collection
from tailor_client.uploads import ProgressFn
from tailor_client.watch import follow_or_cancel

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 3, 130


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

    def transfer(self, verb: str) -> _Transfer:
        return _Transfer(self.err, verb)


class _Transfer:
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


# ---------------------------------------------------------------------------------------------
# Commands: each takes (client, args, output) and returns the exit status.


def _list(kind: str, collection: Callable[[Client], Collection[Any]]) -> Callable[..., int]:
    def run(client: Client, args: argparse.Namespace, output: Output) -> int:
        source = collection(client)
        if args.all:
            output.rows(kind, source.iter(), None)
        else:
            page = source.list(offset=args.offset, limit=args.limit)
            output.rows(kind, page["data"], page["count"])
        return EXIT_OK
    return run


def _get(collection: Callable[[Client], Collection[Any]]) -> Callable[..., int]:
    def run(client: Client, args: argparse.Namespace, output: Output) -> int:
        output.result(collection(client).get(args.id))
        return EXIT_OK
    return run


def corpora_upload(client: Client, args: argparse.Namespace, output: Output) -> int:
    with output.transfer(f"uploading {Path(args.file).name}") as on_progress:
        corpus = client.corpora.upload(args.file, name=args.name, on_progress=on_progress)
    output.result(corpus)
    return EXIT_OK


def corpora_delete(client: Client, args: argparse.Namespace, output: Output) -> int:
    client.corpora.delete(args.id)
    output.err.print(f"deleted corpus {args.id}")
    return EXIT_OK


def eval_sets_create(client: Client, args: argparse.Namespace, output: Output) -> int:
    with output.transfer("uploading judgements") as on_progress:
        eval_set = client.eval_sets.create(args.corpus, args.queries, args.qrels,
                                           name=args.name, on_progress=on_progress)
    output.result(eval_set)
    return EXIT_OK


def query_sets_create(client: Client, args: argparse.Namespace, output: Output) -> int:
    with output.transfer("uploading queries") as on_progress:
        query_set = client.query_sets.create(args.corpus, args.queries, name=args.name,
                                             on_progress=on_progress)
    output.result(query_set)
    return EXIT_OK


def _hyperparameters(value: str | None) -> dict[str, Any] | None:
    """JSON text, or @FILE holding it."""
    if value is None:
        return None
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TailorError(f"--hyperparameters: not JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise TailorError("--hyperparameters: expected a JSON object")
    return parsed


def _ended(job: Any, output: Output) -> int:
    if job is None:
        return EXIT_INTERRUPTED
    output.err.print(job_summary(job))
    if output.as_json:
        output.result(job)
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(job["status"], EXIT_ERROR)


def jobs_create(client: Client, args: argparse.Namespace, output: Output) -> int:
    job = client.jobs.create(
        args.corpus,
        base_model=args.base_model,
        preset=args.preset,
        eval_set_id=args.eval_set,
        query_set_id=args.query_set,
        teacher=args.teacher,
        generator=args.generator,
        query_types=args.query_types.split(",") if args.query_types else None,
        passages=args.passages,
        loss=args.loss,
        hyperparameters=_hyperparameters(args.hyperparameters),
        idempotency_key=args.idempotency_key,
    )
    if not args.wait:
        output.result(job)
        return EXIT_OK
    # The id first, on its own line: a script (or a person who closes the terminal) has it.
    output.err.print(f"job {job['id']} {job['status']}")
    return _ended(follow_or_cancel(client, job["id"], output.err, args.poll_interval), output)


def jobs_wait(client: Client, args: argparse.Namespace, output: Output) -> int:
    return _ended(follow_or_cancel(client, args.id, output.err, args.poll_interval), output)


def jobs_cancel(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.result(client.jobs.cancel(args.id))
    return EXIT_OK


def jobs_events(client: Client, args: argparse.Namespace, output: Output) -> int:
    def show(event: Mapping[str, Any]) -> None:
        if output.as_json:
            print(json.dumps(event))
        else:
            when = event["created_at"][11:19]
            output.out.print(f"{event['id']:>6} {when} {event['kind']:<8} "
                             f"{event.get('stage') or '':<9} {event['message']}", markup=False)

    if args.follow:
        for _, events in client.jobs.watch(args.id, after=args.after):
            for event in events:
                show(event)
    else:
        for event in client.jobs.iter_events(args.id, after=args.after):
            show(event)
    return EXIT_OK


def jobs_report(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.result(client.jobs.report(args.id), lambda report: report_view(report, args.id))
    return EXIT_OK


def models_download(client: Client, args: argparse.Namespace, output: Output) -> int:
    with output.transfer(f"downloading {args.id}") as on_progress:
        folder = client.models.download(args.id, args.directory, on_progress=on_progress)
    output.err.print(f"saved {args.id} in {folder}: SentenceTransformer({str(folder)!r}) "
                     "loads it")
    if output.as_json:
        output.result({"id": args.id, "path": str(folder)})
    return EXIT_OK


def embed(client: Client, args: argparse.Namespace, output: Output) -> int:
    texts = list(args.texts)
    if args.file:
        lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        texts.extend(line for line in lines if line.strip())
    if not texts:
        raise TailorError("embed: give texts as arguments or --file (one text per line)")
    response = client.embed(args.model, texts, input_type=args.input_type)
    # Vectors are data: JSON whatever --json says.
    print(json.dumps(response))
    return EXIT_OK


def health(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.result(client.ready())
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# The parser


# `jobs create` options that pass a text through (the job spec's field, or how it is sent).
JOB_OPTIONS = {
    "--base-model": "student model to specialize (server default)",
    "--preset": "recipe preset, e.g. quick or default",
    "--eval-set": "evaluate on your judgements (evs_...)",
    "--query-set": "also train on your queries (qrs_...)",
    "--teacher": "cross-encoder teacher (registry name)",
    "--generator": "query generator (registry name)",
    "--query-types": "comma-separated, e.g. questions,keywords",
    "--hyperparameters": "recipe overrides as JSON, or @FILE",
    "--idempotency-key": "default: a fresh one per command",
}


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: an option given after the command does not reset one given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--base-url", help="API address (env TAILOR_BASE_URL)")
    common.add_argument("--api-key", help="API key tlr_... (env TAILOR_API_KEY)")
    common.add_argument("--json", action="store_true", help="print results as JSON")
    return common


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=20, help="items per page (max 100)")
    parser.add_argument("--offset", type=int, default=0, help="items to skip")
    parser.add_argument("--all", action="store_true", help="every item, page by page")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="tailor-client", parents=[common],
        description="Specialize a text-embedding model to your corpus with Tailor.",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def group(name: str, help: str) -> Any:
        sub = groups.add_parser(name, help=help, parents=[common])
        return sub.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(subs: Any, name: str, run: Callable[..., int], help: str,
                ) -> argparse.ArgumentParser:
        sub = subs.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(run=run)
        return sub

    def list_and_get(subs: Any, kind: str, pick: Callable[[Client], Collection[Any]],
                     noun: str) -> None:
        _paging(command(subs, "list", _list(kind, pick), f"list {noun}s, newest first"))
        command(subs, "get", _get(pick), f"read a {noun}").add_argument("id")

    def files_for_corpus(subs: Any, run: Callable[..., int], help: str,
                         files: dict[str, str]) -> None:
        create = command(subs, "create", run, help)
        create.add_argument("--corpus", required=True, help="the corpus (crp_...)")
        for flag, text in files.items():
            create.add_argument(flag, required=True, help=text)
        create.add_argument("--name", help="display name")

    corpora = group("corpora", "upload, list, read and delete corpora")
    upload = command(corpora, "upload", corpora_upload, "upload a BEIR corpus (.jsonl or .gz)")
    upload.add_argument("file")
    upload.add_argument("--name", help="display name (default: the file name)")
    list_and_get(corpora, "corpora", lambda c: c.corpora, "corpus")
    command(corpora, "delete", corpora_delete, "delete a corpus").add_argument("id")

    eval_sets = group("eval-sets", "judged queries to evaluate jobs with")
    files_for_corpus(eval_sets, eval_sets_create, "upload judgements for a corpus",
                     {"--queries": "BEIR queries.jsonl", "--qrels": "BEIR qrels .tsv"})
    list_and_get(eval_sets, "eval-sets", lambda c: c.eval_sets, "eval set")

    query_sets = group("query-sets", "your users' own queries (no judgements) to train on")
    files_for_corpus(query_sets, query_sets_create, "upload queries for a corpus",
                     {"--queries": "BEIR queries.jsonl"})
    list_and_get(query_sets, "query-sets", lambda c: c.query_sets, "query set")

    jobs = group("jobs", "start, follow, cancel jobs and read their reports")
    create = command(jobs, "create", jobs_create, "start a job (--wait follows it)")
    create.add_argument("--corpus", required=True, help="corpus id (crp_...)")
    for flag, help in JOB_OPTIONS.items():
        create.add_argument(flag, help=help)
    create.add_argument("--passages", type=int, help="passages sampled for generation")
    create.add_argument("--loss", choices=["listwise", "infonce"])
    create.add_argument("--wait", action="store_true", help="follow the job to its end")
    create.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    list_and_get(jobs, "jobs", lambda c: c.jobs, "job")
    wait = command(jobs, "wait", jobs_wait, "follow a job to its end with progress bars")
    wait.add_argument("id")
    wait.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    command(jobs, "cancel", jobs_cancel, "cancel a job").add_argument("id")
    events = command(jobs, "events", jobs_events, "a job's events, oldest first")
    events.add_argument("id")
    events.add_argument("--after", type=int, help="only events with a larger id")
    events.add_argument("--follow", action="store_true", help="keep printing until it ends")
    command(jobs, "report", jobs_report, "the evaluation report as tables").add_argument("id")

    models = group("models", "base and tuned models")
    list_and_get(models, "models", lambda c: c.models, "model")
    download = command(models, "download", models_download,
                       "download a tuned model, unpacked for SentenceTransformer(DIR)")
    download.add_argument("id")
    download.add_argument("directory", metavar="DIR")

    embed_parser = groups.add_parser("embed", parents=[common], help="embed texts (JSON out)")
    embed_parser.set_defaults(run=embed)
    embed_parser.add_argument("texts", nargs="*", metavar="TEXT")
    embed_parser.add_argument("--model", required=True, help="base model name or mdl_...")
    embed_parser.add_argument("--input-type", choices=["query", "passage"], default="passage")
    embed_parser.add_argument("--file", help="texts, one per line")

    health_parser = groups.add_parser("health", parents=[common],
                                      help="is the API ready (database, broker, object store)")
    health_parser.set_defaults(run=health)
    return parser


def _error_line(exc: APIError) -> str:
    where = ", ".join(f"{k} {v}" for k, v in exc.context.items()
                      if k in ("field", "line", "resource", "id"))
    return f"error: {exc.code}: {exc.detail}" + (f" ({where})" if where else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Output(getattr(args, "json", False))
    try:
        with Client(getattr(args, "base_url", None), getattr(args, "api_key", None)) as client:
            return args.run(client, args, output)
    except APIError as exc:
        output.err.print(_error_line(exc), markup=False)
    except APIConnectionError as exc:
        output.err.print(f"error: cannot reach the API: {exc}", markup=False)
    except (TailorError, OSError) as exc:
        output.err.print(f"error: {exc}", markup=False)
    except KeyboardInterrupt:
        output.err.print("interrupted")
        return EXIT_INTERRUPTED
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
