"""Command line commands for serving and account routes: rerank, bulk embedding jobs, API keys,
webhooks and model uploads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tailor_client.cli_base import EXIT_OK, Output, Parser, ended, pairs
from tailor_client.client import Client
from tailor_client.display import embedding_job_summary, rerank_table
from tailor_client.errors import TailorError
from tailor_client.watch import follow_or_cancel

# ---------------------------------------------------------------------------------------------
# Commands: each takes (client, args, output) and returns the exit status.


def rerank(client: Client, args: argparse.Namespace, output: Output) -> int:
    documents = list(args.documents)
    if args.file:
        lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        documents.extend(line for line in lines if line.strip())
    if not documents:
        raise TailorError("rerank: give documents as arguments or --file (one a line)")
    response = client.rerank(args.model, args.query, documents, top_n=args.top_n,
                             raw_scores=args.raw_scores)
    output.result(response, lambda r: rerank_table(r, documents))
    return EXIT_OK


def rerank_models(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.rows("rerank-models", client.rerank_models(), None)
    return EXIT_OK


def models_upload(client: Client, args: argparse.Namespace, output: Output) -> int:
    with output.transfer(f"uploading {Path(args.file).name}") as on_progress:
        model = client.models.upload(args.file, name=args.name, on_progress=on_progress)
    output.result(model)
    return EXIT_OK


def keys_create(client: Client, args: argparse.Namespace, output: Output) -> int:
    key = client.api_keys.create(args.name, scope=args.scope,
                                 expires_in_days=args.expires_in_days)
    output.result(key)
    output.err.print(f"store the key now: it is not shown again (revoke it with "
                     f"`tailor-client keys revoke {key['id']}`)")
    return EXIT_OK


def keys_revoke(client: Client, args: argparse.Namespace, output: Output) -> int:
    client.api_keys.revoke(args.id)
    output.err.print(f"revoked key {args.id}")
    return EXIT_OK


def _follow(client: Client, job_id: str, args: argparse.Namespace, output: Output) -> int:
    job = follow_or_cancel(client.embedding_jobs, job_id, output.err, args.poll_interval,
                           noun="embedding job")
    return ended(job, output, embedding_job_summary)


def embedding_jobs_create(client: Client, args: argparse.Namespace, output: Output) -> int:
    job = client.embedding_jobs.create(
        args.model, args.corpus, input_type=args.input_type,
        long_documents=args.long_documents, shard_documents=args.shard_documents,
        name=args.name, metadata=pairs(args.metadata),
    )
    if not args.wait:
        output.result(job)
        return EXIT_OK
    # The id first, on its own line: a script (or a person who closes the terminal) has it.
    output.err.print(f"embedding job {job['id']} {job['status']}")
    return _follow(client, job["id"], args, output)


def embedding_jobs_wait(client: Client, args: argparse.Namespace, output: Output) -> int:
    return _follow(client, args.id, args, output)


def embedding_jobs_cancel(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.result(client.embedding_jobs.cancel(args.id))
    return EXIT_OK


def embedding_jobs_files(client: Client, args: argparse.Namespace, output: Output) -> int:
    files = client.embedding_jobs.files(args.id)
    if output.as_json:
        output.result(files)
    else:
        output.rows("embedding-files", files["data"], None)
        output.err.print("complete" if files["complete"] else
                         "not complete: more shards appear as the job runs")
    return EXIT_OK


def embedding_jobs_download(client: Client, args: argparse.Namespace, output: Output) -> int:
    jobs = client.embedding_jobs
    folder = Path(args.directory)
    if args.file:  # single files, e.g. the shards finished so far of a running job
        saved = []
        for name in args.file:
            with output.transfer(f"downloading {name}") as on_progress:
                saved.append(str(jobs.download_file(args.id, name, folder / name,
                                                    on_progress=on_progress)))
        output.err.print(f"saved {len(saved)} files of {args.id} in {folder}")
    else:
        with output.transfer(f"downloading {args.id}") as on_progress:
            jobs.download(args.id, folder, on_progress=on_progress)
        saved = sorted(str(p) for p in folder.iterdir())
        output.err.print(f"saved {args.id} in {folder}: manifest.json, vectors-*.npy "
                         "(float32) and ids-*.jsonl")
    if output.as_json:
        output.result({"id": args.id, "path": str(folder), "files": saved})
    return EXIT_OK


def webhooks_create(client: Client, args: argparse.Namespace, output: Output) -> int:
    webhook = client.webhooks.create(args.url, events=args.event,
                                     description=args.description, enabled=not args.disabled)
    output.result(webhook)
    output.err.print("store the signing secret now: it is not shown again "
                     "(tailor_client.webhooks.verify checks a delivery with it)")
    return EXIT_OK


def webhooks_update(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.result(client.webhooks.update(args.id, url=args.url, events=args.event,
                                         description=args.description, enabled=args.enabled))
    return EXIT_OK


def webhooks_delete(client: Client, args: argparse.Namespace, output: Output) -> int:
    client.webhooks.delete(args.id)
    output.err.print(f"deleted webhook {args.id}")
    return EXIT_OK


def webhooks_deliveries(client: Client, args: argparse.Namespace, output: Output) -> int:
    if args.all:
        output.rows("webhook-deliveries",
                    client.webhooks.iter_deliveries(args.id, status=args.status), None)
    else:
        page = client.webhooks.deliveries(args.id, status=args.status, offset=args.offset,
                                          limit=args.limit)
        output.rows("webhook-deliveries", page["data"], page["count"])
    return EXIT_OK


def webhooks_redeliver(client: Client, args: argparse.Namespace, output: Output) -> int:
    output.result(client.webhooks.redeliver(args.id, args.delivery_id))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# The parser


def add_model_upload(cli: Parser, models: Any) -> None:
    upload = cli.command(models, "upload", models_upload,
                         "upload your own sentence-transformers model (.tar.gz)")
    upload.add_argument("file", metavar="FILE")
    upload.add_argument("--name", help="display name (default: the file name)")


def add_commands(cli: Parser) -> None:
    rerank_parser = cli.top("rerank", rerank, "order documents by relevance to a query")
    rerank_parser.add_argument("model", metavar="MODEL", help="a rerank model (rerank-models)")
    rerank_parser.add_argument("query", metavar="QUERY")
    rerank_parser.add_argument("documents", nargs="*", metavar="DOC")
    rerank_parser.add_argument("--file", help="documents, one a line")
    rerank_parser.add_argument("--top-n", type=int, help="only the best N")
    rerank_parser.add_argument("--raw-scores", action="store_true",
                               help="the model's raw scores instead of 0..1")
    cli.top("rerank-models", rerank_models, "the models `rerank` serves")

    keys = cli.group("keys", "create, list and revoke API keys")
    create = cli.command(keys, "create", keys_create, "create an API key (shown once)")
    create.add_argument("--name", default="", help="to recognise it in the list")
    create.add_argument("--scope", choices=["train", "embed"], default="train",
                        help="embed: the embedding and rerank routes only")
    create.add_argument("--expires-in-days", type=int, help="default: until revoked")
    cli.list_and_get(keys, "api-keys", lambda c: c.api_keys, "API key")
    cli.command(keys, "revoke", keys_revoke, "revoke an API key").add_argument("id")

    add_webhooks(cli)

    jobs = cli.group("embedding-jobs", "embed a whole corpus on the workers, download vectors")
    create = cli.command(jobs, "create", embedding_jobs_create,
                         "start a bulk embedding job (--wait follows it)")
    create.add_argument("--model", required=True, help="base model name or mdl_...")
    create.add_argument("--corpus", help="corpus id (default for a tuned model: its corpus)")
    create.add_argument("--input-type", choices=["passage", "query"])
    create.add_argument("--long-documents", choices=["chunk", "truncate"])
    create.add_argument("--shard-documents", type=int, help="documents per shard file")
    create.add_argument("--name", help="your label for the job")
    cli.metadata_option(create, "a pair of your own (repeatable)")
    create.add_argument("--wait", action="store_true", help="follow the job to its end")
    create.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    cli.list_and_get(jobs, "embedding-jobs", lambda c: c.embedding_jobs, "embedding job")
    cli.labels(jobs, lambda c: c.embedding_jobs, "embedding job")
    cli.delete(jobs, lambda c: c.embedding_jobs, "embedding job")
    wait = cli.command(jobs, "wait", embedding_jobs_wait, "follow a job to its end")
    wait.add_argument("id")
    wait.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    cli.command(jobs, "cancel", embedding_jobs_cancel, "cancel a job").add_argument("id")
    cli.events(jobs, lambda c: c.embedding_jobs)
    cli.command(jobs, "files", embedding_jobs_files,
                "the files stored so far").add_argument("id")
    download = cli.command(jobs, "download", embedding_jobs_download,
                           "download a succeeded job's files unpacked as DIR")
    download.add_argument("id")
    download.add_argument("directory", metavar="DIR")
    download.add_argument("--file", action="append", metavar="NAME",
                          help="only this file (repeatable; works while the job runs)")


EVENTS = ["job.succeeded", "job.failed", "job.cancelled", "job.stage_completed"]


def add_webhooks(cli: Parser) -> None:
    hooks = cli.group("webhooks", "endpoints told when jobs finish, and their deliveries")
    create = cli.command(hooks, "create", webhooks_create,
                         "register an endpoint (its signing secret is shown once)")
    create.add_argument("url", metavar="URL")
    create.add_argument("--event", action="append", choices=EVENTS,
                        help="an event type to send (repeatable; default: all)")
    create.add_argument("--description", default="")
    create.add_argument("--disabled", action="store_true", help="register it switched off")
    cli.list_and_get(hooks, "webhooks", lambda c: c.webhooks, "webhook")
    update = cli.command(hooks, "update", webhooks_update,
                         "change an endpoint (options left out stay as they are)")
    update.add_argument("id")
    update.add_argument("--url")
    update.add_argument("--event", action="append", choices=EVENTS,
                        help="the event types to send from now on (repeatable)")
    update.add_argument("--description")
    switch = update.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_const", const=True)
    switch.add_argument("--disable", dest="enabled", action="store_const", const=False)
    cli.command(hooks, "delete", webhooks_delete, "delete an endpoint").add_argument("id")
    deliveries = cli.command(hooks, "deliveries", webhooks_deliveries,
                             "an endpoint's deliveries, newest first, with their attempts")
    deliveries.add_argument("id")
    deliveries.add_argument("--status", choices=["pending", "succeeded", "failed"])
    cli.paging(deliveries)
    redeliver = cli.command(hooks, "redeliver", webhooks_redeliver,
                            "send a finished delivery again")
    redeliver.add_argument("id")
    redeliver.add_argument("delivery_id", metavar="DELIVERY_ID")
