"""What the command line shows people: tables of resources and the evaluation report."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tailor_client.types import EmbeddingJob, Job, Report, RerankResponse

PRIMARY = "ndcg@10"
METRIC_NAMES = {"ndcg@10": "nDCG@10", "ndcg@100": "nDCG@100", "recall@10": "Recall@10",
                "recall@100": "Recall@100", "mrr@10": "MRR@10"}
STATUS_STYLES = {"succeeded": "green", "failed": "red", "cancelled": "yellow",
                 "cancelling": "yellow", "running": "cyan", "queued": "dim",
                 "active": "green", "expired": "yellow", "revoked": "red",
                 "pending": "cyan"}

# Column name -> how to show a field of the row; lists print these columns in order.
Column = tuple[str, Callable[[Mapping[str, Any]], str | Text]]
# What a narrow terminal leaves out first, in this order; ids are never cut short (people copy
# them into the next command), so the other columns give way.
NARROW_DROPS = ("created", "description", "next attempt", "sha256", "source", "bytes",
                "licence", "judgements", "base model", "stage", "dim", "expires", "prefix",
                "corpus", "progress", "kind", "documents", "queries", "rows", "recommended",
                "events", "name")
ID_COLUMNS = {"id", "corpus", "model"}
LONG_VALUE = 160


def field(name: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda row: "" if row.get(name) is None else str(row[name])


def when(name: str) -> Callable[[Mapping[str, Any]], str]:
    """An ISO timestamp to the minute, which is what a person scanning a list needs."""
    return lambda row: (row.get(name) or "")[:16].replace("T", " ")


def percent(row: Mapping[str, Any]) -> str:
    return f"{100 * float(row.get('progress') or 0):.0f}%"


def status(row: Mapping[str, Any]) -> Text:
    value = str(row.get("status", ""))
    return Text(value, style=STATUS_STYLES.get(value, ""))


def last_answer(row: Mapping[str, Any]) -> str:
    """A delivery's latest attempt: the receiver's status code, or what went wrong."""
    log = row.get("attempt_log") or []
    if not log:
        return ""
    last = log[-1]
    return str(last["status_code"]) if last.get("status_code") is not None else \
        str(last.get("error") or "")


COLUMNS: dict[str, list[Column]] = {
    "corpora": [("id", field("id")), ("name", field("name")), ("documents", field("documents")),
                ("bytes", field("size_bytes")), ("created", when("created_at"))],
    "eval-sets": [("id", field("id")), ("corpus", field("corpus_id")), ("name", field("name")),
                  ("queries", field("queries")), ("judgements", field("judgements")),
                  ("created", when("created_at"))],
    "query-sets": [("id", field("id")), ("corpus", field("corpus_id")), ("name", field("name")),
                   ("queries", field("queries")), ("created", when("created_at"))],
    "jobs": [("id", field("id")), ("name", field("name")), ("status", status),
             ("stage", field("stage")),
             ("progress", percent), ("model", field("model_id")),
             ("recommended", field("recommended")), ("created", when("created_at"))],
    "models": [("id", field("id")), ("kind", field("kind")), ("name", field("name")),
               ("base model", field("base_model")), ("dim", field("dim")),
               ("recommended", field("recommended")), ("licence", field("licence"))],
    "embedding-jobs": [("id", field("id")), ("name", field("name")), ("status", status),
                       ("progress", percent),
                       ("model", field("model")), ("corpus", field("corpus_id")),
                       ("rows", lambda row: str((row.get("metrics") or {}).get("rows", ""))),
                       ("created", when("created_at"))],
    "api-keys": [("id", field("id")), ("name", field("name")), ("scope", field("scope")),
                 ("prefix", field("prefix")), ("status", status),
                 ("expires", when("expires_at")), ("created", when("created_at"))],
    "embedding-files": [("name", field("name")), ("kind", field("kind")),
                        ("shard", field("shard")), ("rows", field("rows")),
                        ("bytes", field("size")), ("sha256", field("sha256"))],
    "webhooks": [("id", field("id")), ("url", field("url")),
                 ("events", lambda row: ",".join(row.get("events") or [])),
                 ("enabled", field("enabled")), ("description", field("description")),
                 ("created", when("created_at"))],
    "webhook-deliveries": [("id", field("id")), ("event", field("event_type")),
                           ("status", status), ("attempts", field("attempts")),
                           ("last answer", last_answer), ("next attempt", when("next_attempt_at")),
                           ("created", when("created_at"))],
    "rerank-models": [("id", field("id")), ("licence", field("licence")),
                      ("source", field("source"))],
}


def resource_table(kind: str, rows: Iterable[Mapping[str, Any]], total: int | None = None,
                   width: int | None = None) -> Table:
    """A list of corpora, jobs, ... as a table, fitted to `width` by leaving out the least
    needed columns; `total` adds "n of total" as its caption."""
    columns = COLUMNS[kind]
    cells = [[Text(v) if isinstance(v, str) else v for v in (show(row) for _, show in columns)]
             for row in rows]
    widths = {name: max([len(name), *(row[i].cell_len for row in cells)]) + 2
              for i, (name, _) in enumerate(columns)}
    shown = [name for name, _ in columns]
    for name in NARROW_DROPS:
        if width is None or sum(widths[n] for n in shown) <= width:
            break
        if name in shown:
            shown.remove(name)
    table = Table(box=None, header_style="bold")
    for name in shown:
        table.add_column(name, no_wrap=name in ID_COLUMNS, min_width=widths[name] - 2
                         if name in ID_COLUMNS else None)
    index = [i for i, (name, _) in enumerate(columns) if name in shown]
    for row in cells:
        table.add_row(*[row[i] for i in index])
    if total is not None and total > len(cells):
        table.caption = f"{len(cells)} of {total}: --all lists every one"
    return table


def resource_fields(row: Mapping[str, Any]) -> Table:
    """One resource as name / value lines. Nested values print as compact JSON, cut short
    when long (a job's metrics and recipe: `--json` prints them, `jobs report` reads them)."""
    import json

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in row.items():
        if name == "status":
            table.add_row(name, status(row))
            continue
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        if len(shown) > LONG_VALUE:
            shown = shown[:LONG_VALUE] + f"... ({len(shown)} characters: --json prints it)"
        table.add_row(name, Text(shown))
    return table


# ---------------------------------------------------------------------------------------------
# The evaluation report


def _metric(name: str) -> str:
    return METRIC_NAMES.get(name, name)


def _p(value: float) -> str:
    return "p < 0.001" if value < 0.0005 else f"p = {value:.3f}"


def _signed(value: float | None) -> Text:
    if value is None:
        return Text("")
    style = "green" if value > 0 else "red" if value < 0 else ""
    return Text(f"{value:+.4f}", style=style)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else ""


def _metrics_of(report: Report) -> list[str]:
    base, tuned = report.get("base") or {}, report.get("tuned") or {}
    names = [n for n, v in base.items() if n != "queries" and isinstance(v, int | float)
             and isinstance(tuned.get(n), int | float)]
    known = [n for n in METRIC_NAMES if n in names]
    return known + sorted(set(names) - set(known))


def recommendation(report: Report) -> Panel:
    """The answer first: which model to serve, and how sure the gain is."""
    chosen = report.get("recommended") or "?"
    gain = (report.get("gain") or {}).get(PRIMARY)
    lines = [Text.assemble(("Recommended: ", "bold"),
                           (chosen, "bold green" if chosen == "tuned" else "bold yellow"))]
    if report.get("base_kept"):
        lines.append(Text("Training never beat the base model, so the tuned model is the base."))
    elif gain is not None:
        sig = report.get("significance")
        text = Text.assemble(f"{_metric(PRIMARY)} gain ", _signed(gain))
        if sig:
            low, high = sig["ci95"]
            text.append(f", 95% interval [{low:+.4f}, {high:+.4f}], {_p(sig['p_value'])}")
        lines.append(text)
    return Panel(Group(*lines), expand=False)


def comparison_table(report: Report) -> Table:
    """Base vs tuned, one row per metric; the primary metric's gain with its 95% interval."""
    base, tuned, gain = report["base"], report["tuned"], report.get("gain") or {}
    sig = report.get("significance")
    table = Table(header_style="bold", title="Base vs tuned",
                  caption=f"{report.get('judgements') or '?'} judgements, "
                          f"{base.get('queries', '?')} queries")
    table.add_column("metric")
    for name in ("base", "tuned", "gain"):
        table.add_column(name, justify="right")
    table.add_column("95% interval of the gain", justify="right")
    for name in _metrics_of(report):
        interval = ""
        if sig and sig.get("metric") == name:
            low, high = sig["ci95"]
            interval = f"[{low:+.4f}, {high:+.4f}]"
        table.add_row(_metric(name), _number(base[name]), _number(tuned[name]),
                      _signed(gain.get(name, tuned[name] - base[name])), interval)
    return table


def _interval(sig: dict[str, Any]) -> str:
    low, high = sig["ci95"]
    return f"[{low:+.4f}, {high:+.4f}]"


def setups_table(report: Report) -> Table | None:
    """The retrieval set-ups (reports from version 2): BM25, each model on chunks, the tuned
    model also on whole documents, each fused with BM25; nDCG@10, Recall@100 and the nDCG@10
    difference against the tuned model on chunks with its 95% interval. The best is marked."""
    section = report.get("retrievers") or {}
    rows = section.get("rows") or []
    if not rows:
        return None
    against = str(section.get("reference", "tuned")).split("-")[0]
    best = section.get("best") or {}
    table = Table(header_style="bold", title="Retrieval set-ups",
                  caption=f"the same {section.get('queries', '?')} queries; differences in "
                          f"{_metric(PRIMARY)} against {against} on chunks")
    table.add_column("set-up")
    for name in (_metric(PRIMARY), _metric("recall@100"), f"vs {against}", "95% interval"):
        table.add_column(name, justify="right")
    for row in rows:
        versus = row.get("vs_reference")
        name = row["setup"] + ("  (best)" if row["id"] == best.get("id") else "")
        table.add_row(Text(name, style="bold" if row["id"] == best.get("id") else ""),
                      _number(row.get(PRIMARY)), _number(row.get("recall@100")),
                      _signed(versus["difference"]) if versus else Text("reference"),
                      _interval(versus) if versus else "")
    return table


def best_setup_line(report: Report) -> Text | None:
    """The best set-up with its parameters, and what chunking buys over whole documents."""
    section = report.get("retrievers") or {}
    best = section.get("best")
    if not best:
        return None
    text = Text.assemble(("Best set-up: ", "bold"), (best["setup"], "bold green"),
                         f" ({_metric(PRIMARY)} {best[PRIMARY]:.4f}")
    if not best.get("reference"):
        text.append(f", {best['difference']:+.4f}, 95% interval {_interval(best)}")
        if best.get("within_noise"):
            text.append(": within noise of the reference")
    text.append(")")
    names = {row["id"]: row["setup"] for row in section.get("rows") or []}
    ties = [names[t] for t in best.get("ties") or [] if t in names]
    if ties:
        text.append("\nAs good within noise: " + "; ".join(ties))
    for model, sig in (section.get("chunking") or {}).items():
        text.append(f"\nChunking ({model}): {sig['difference']:+.4f} {_metric(PRIMARY)} over "
                    f"whole documents, 95% interval {_interval(sig)}, {_p(sig['p_value'])}")
    if section.get("whole_documents") is False and section.get("chunked_documents"):
        text.append("\nWhole-document rows left out (evaluation.whole_documents off)")
    return text


def per_query_counts(report: Report) -> Text | None:
    sig = report.get("significance")
    if not sig:
        return None
    return Text(f"Per query ({_metric(sig['metric'])}): {sig['better']} better, "
                f"{sig['worse']} worse, {sig['same']} unchanged of {sig['queries']}")


def per_type_table(report: Report) -> Table | None:
    rows = report.get("per_query_type") or {}
    if not rows:
        return None
    table = Table(header_style="bold", title="Per query type")
    table.add_column("query type")
    for name in ("queries", f"base {_metric(PRIMARY)}", f"tuned {_metric(PRIMARY)}", "gain"):
        table.add_column(name, justify="right")
    for name, row in rows.items():
        base, tuned = row.get("base") or {}, row.get("tuned") or {}
        table.add_row(name, str(base.get("queries", "")), _number(base.get(PRIMARY)),
                      _number(tuned.get(PRIMARY)), _signed((row.get("gain") or {}).get(PRIMARY)))
    return table


def teacher_line(report: Report) -> Text | None:
    check = report.get("teacher_check")
    if not check or check.get("teacher") is None or check.get("student") is None:
        return None
    text = Text.assemble(
        ("Teacher check: ", "bold"),
        f"teacher {_metric(check.get('metric', PRIMARY))} {check['teacher']:.4f} vs student "
        f"{check['student']:.4f} (re-ranking the student's top {check.get('depth', '?')}, "
        f"{check.get('queries', '?')} queries)",
    )
    if check.get("caveat"):
        text.append(f"\n  {check['caveat']}", style="dim")
    return text


def report_view(report: Report, job_id: str | None = None) -> Group:
    """The whole report: recommendation, base vs tuned, the retrieval set-ups and the best of
    them, per query, per type, teacher check, warnings."""
    parts: list[RenderableType | None] = [
        Text(f"Report of {job_id}", style="bold") if job_id else None,
        recommendation(report),
        comparison_table(report),
        setups_table(report),
        best_setup_line(report),
        per_query_counts(report),
        per_type_table(report),
        teacher_line(report),
    ]
    if report.get("excluded_trained_queries"):
        parts.append(Text(f"Left out: {report['excluded_trained_queries']} judged queries that "
                          "were also training or example queries"))
    warnings = report.get("warnings") or []
    if warnings:
        listed = Table.grid(padding=(0, 1))
        listed.add_column(no_wrap=True)
        listed.add_column(style="yellow")
        for warning in warnings:
            listed.add_row(" !", Text(warning))
        parts.extend([Text("Warnings:", style="bold yellow"), listed])
    return Group(*[p for p in parts if p is not None])


def job_summary(job: Job) -> Text:
    """One line when a job ends: how it ended, the model and the headline figures."""
    text = Text.assemble(f"job {job['id']} ", status(job))
    if job["status"] == "succeeded":
        metrics = job.get("metrics") or {}
        base = (metrics.get("base") or {}).get(PRIMARY)
        tuned = (metrics.get("tuned") or {}).get(PRIMARY)
        text.append(f": model {job['model_id']}, recommended {job.get('recommended')}")
        if base is not None and tuned is not None:
            text.append(f", {_metric(PRIMARY)} {base:.4f} -> {tuned:.4f}")
    elif job.get("error"):
        error = job["error"] or {}
        text.append(f": {error.get('error', 'error')}: {error.get('detail', '')}")
    return text


def embedding_job_summary(job: EmbeddingJob) -> Text:
    """One line when a bulk embedding job ends: how it ended and what it stored."""
    text = Text.assemble(f"embedding job {job['id']} ", status(job))
    metrics = job.get("metrics") or {}
    if job["status"] == "succeeded":
        text.append(f": {metrics.get('rows', '?')} vectors of {metrics.get('documents', '?')} "
                    f"documents, dim {metrics.get('dim', '?')}, "
                    f"{metrics.get('shards', '?')} shards")
    elif job.get("error"):
        error = job["error"] or {}
        text.append(f": {error.get('error', 'error')}: {error.get('detail', '')}")
    return text


def rerank_table(response: RerankResponse, documents: list[str]) -> Table:
    """Reranked documents, most relevant first: rank, position in the request, score, text."""
    table = Table(box=None, header_style="bold", title=f"Reranked by {response['model']}")
    table.add_column("rank", justify="right")
    table.add_column("index", justify="right")
    table.add_column("score", justify="right")
    table.add_column("document")
    for rank, result in enumerate(response["results"], 1):
        document = result.get("document")
        text = document["text"] if document else documents[result["index"]]
        table.add_row(str(rank), str(result["index"]), f"{result['relevance_score']:.4f}",
                      Text(text if len(text) <= LONG_VALUE else text[:LONG_VALUE] + "..."))
    return table
