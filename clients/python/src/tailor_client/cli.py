"""`tailor-client`: the Tailor API from a terminal.

Results go to stdout (tables, or JSON with --json); progress bars, prompts and errors go to
stderr, so `tailor-client --json jobs get ID | jq` works. Exit status: 0 done, 1 an error (or a
job that failed), 2 a usage error, 3 a job that was cancelled, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tailor_client import cli_serving
from tailor_client.cli_base import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Output,
    Parser,
    ended,
    pairs,
)
from tailor_client.client import Client
from tailor_client.display import job_summary, report_view
from tailor_client.errors import APIConnectionError, APIError, TailorError
from tailor_client.watch import follow_or_cancel

# ---------------------------------------------------------------------------------------------
# Commands: each takes (client, args, output) and returns the exit status.


def corpora_upload(client: Client, args: argparse.Namespace, output: Output) -> int:
    with output.transfer(f"uploading {Path(args.file).name}") as on_progress:
        corpus = client.corpora.upload(args.file, name=args.name, on_progress=on_progress)
    output.result(corpus)
    return EXIT_OK


def corpora_delete(client: Client, args: argparse.Namespace, output: Output) -> int:
    client.corpora.delete(args.id, cascade=args.cascade)
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
        name=args.name,
        metadata=pairs(args.metadata),
        idempotency_key=args.idempotency_key,
    )
    if not args.wait:
        output.result(job)
        return EXIT_OK
    # The id first, on its own line: a script (or a person who closes the terminal) has it.
    output.err.print(f"job {job['id']} {job['status']}")
    return ended(follow_or_cancel(client.jobs, job["id"], output.err, args.poll_interval),
                 output, job_summary)


def jobs_wait(client: Client, args: argparse.Namespace, output: Output) -> int:
    return ended(follow_or_cancel(client.jobs, args.id, output.err, args.poll_interval),
                 output, job_summary)


def jobs_cancel(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.result(client.jobs.cancel(args.id))
    return EXIT_OK


def jobs_report(client: Client, args: argparse.Namespace, output: Output) -> int:
    if args.html:
        client.jobs.report_html(args.id, args.html)
        output.err.print(f"saved the report of {args.id} as {args.html}")
        return EXIT_OK
    output.result(client.jobs.report(args.id), lambda report: report_view(report, args.id))
    return EXIT_OK


def models_download(client: Client, args: argparse.Namespace, output: Output) -> int:
    with output.transfer(f"downloading {args.id}") as on_progress:
        folder = client.models.download(args.id, args.directory, onnx=args.onnx,
                                        on_progress=on_progress)
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


def build_parser() -> argparse.ArgumentParser:
    cli = Parser("tailor-client",
                 "Specialize a text-embedding model to your corpus with Tailor.")

    def files_for_corpus(subs: Any, run: Any, help: str, files: dict[str, str]) -> None:
        create = cli.command(subs, "create", run, help)
        create.add_argument("--corpus", required=True, help="the corpus (crp_...)")
        for flag, text in files.items():
            create.add_argument(flag, required=True, help=text)
        create.add_argument("--name", help="display name")

    corpora = cli.group("corpora", "upload, list, read and delete corpora")
    upload = cli.command(corpora, "upload", corpora_upload,
                         "upload a BEIR corpus (.jsonl or .gz)")
    upload.add_argument("file")
    upload.add_argument("--name", help="display name (default: the file name)")
    cli.list_and_get(corpora, "corpora", lambda c: c.corpora, "corpus")
    delete = cli.command(corpora, "delete", corpora_delete,
                         "delete a corpus and the eval and query sets built on it")
    delete.add_argument("id")
    delete.add_argument("--cascade", action="store_true",
                        help="cancel the unfinished jobs that use it instead of refusing")

    eval_sets = cli.group("eval-sets", "judged queries to evaluate jobs with")
    files_for_corpus(eval_sets, eval_sets_create, "upload judgements for a corpus",
                     {"--queries": "BEIR queries.jsonl", "--qrels": "BEIR qrels .tsv"})
    cli.list_and_get(eval_sets, "eval-sets", lambda c: c.eval_sets, "eval set")
    cli.delete(eval_sets, lambda c: c.eval_sets, "eval set")

    query_sets = cli.group("query-sets", "your users' own queries (no judgements) to train on")
    files_for_corpus(query_sets, query_sets_create, "upload queries for a corpus",
                     {"--queries": "BEIR queries.jsonl"})
    cli.list_and_get(query_sets, "query-sets", lambda c: c.query_sets, "query set")
    cli.delete(query_sets, lambda c: c.query_sets, "query set")

    jobs = cli.group("jobs", "start, follow, cancel jobs and read their reports")
    create = cli.command(jobs, "create", jobs_create, "start a job (--wait follows it)")
    create.add_argument("--corpus", required=True, help="corpus id (crp_...)")
    for flag, help in JOB_OPTIONS.items():
        create.add_argument(flag, help=help)
    create.add_argument("--passages", type=int, help="passages sampled for generation")
    create.add_argument("--loss", choices=["listwise", "infonce"])
    create.add_argument("--wait", action="store_true", help="follow the job to its end")
    create.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    create.add_argument("--name", help="your label for the job (its tuned model takes it)")
    cli.metadata_option(create, "a pair of your own (repeatable)")
    cli.list_and_get(jobs, "jobs", lambda c: c.jobs, "job")
    cli.labels(jobs, lambda c: c.jobs, "job")
    cli.delete(jobs, lambda c: c.jobs, "job")
    wait = cli.command(jobs, "wait", jobs_wait, "follow a job to its end with progress bars")
    wait.add_argument("id")
    wait.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    cli.command(jobs, "cancel", jobs_cancel, "cancel a job").add_argument("id")
    cli.events(jobs, lambda c: c.jobs)
    report = cli.command(jobs, "report", jobs_report, "the evaluation report as tables")
    report.add_argument("id")
    report.add_argument("--html", metavar="FILE", help="save the report page as FILE instead")

    models = cli.group("models", "base, tuned and uploaded models")
    cli.list_and_get(models, "models", lambda c: c.models, "model")
    cli.labels(models, lambda c: c.models, "model")
    cli.delete(models, lambda c: c.models, "model")
    download = cli.command(models, "download", models_download,
                           "download your model, unpacked for SentenceTransformer(DIR)")
    download.add_argument("id")
    download.add_argument("directory", metavar="DIR")
    download.add_argument("--onnx", action="store_true",
                          help="add onnx/model.onnx, an ONNX export with the same vectors")
    cli_serving.add_model_upload(cli, models)

    embed_parser = cli.top("embed", embed, "embed texts (JSON out)")
    embed_parser.add_argument("texts", nargs="*", metavar="TEXT")
    embed_parser.add_argument("--model", required=True, help="base model name or mdl_...")
    embed_parser.add_argument("--input-type", choices=["query", "passage"], default="passage")
    embed_parser.add_argument("--file", help="texts, one per line")

    cli_serving.add_commands(cli)
    cli.top("health", health, "is the API ready (database, broker, object store)")
    return cli.parser


def _error_line(exc: APIError) -> str:
    where = ", ".join(f"{k} {v}" for k, v in exc.context.items()
                      if k in ("field", "line", "resource", "id"))
    line = f"error: {exc.code}: {exc.detail}" + (f" ({where})" if where else "")
    # The id the server logged the request under: what support asks for.
    return line + (f" [request {exc.request_id}]" if exc.request_id else "")


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
