"""The evaluation report as one self-contained HTML page (no app or HTTP imports).

`render_report_html(report, history=..., filter_summary=...)` turns the evaluate stage's
report.json (ml_core.evaluation.build_report, plus the distill stage's history.json and the
filter stage's filter.json when at hand) into a page that reads top to bottom: the
recommendation, base vs tuned with the interval, the retrieval set-ups (BM25, hybrid, whole
documents) and the best of them, the per-query gains, per query type, the dev
loss per epoch with the kept checkpoint, the teacher check, the warnings and the recipe.

The page fetches nothing: its stylesheet is inline and pinned by hash in its own
Content-Security-Policy (`report_csp`), charts are inline SVG (app.reports.charts), and there is
no script. The API serves it; the same page can be written next to a downloaded model.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from app.reports import charts
from ml_core.evaluation import PRIMARY, TEACHER_MARGIN, teacher_is_better
from ml_core.report import DISPLAY, METRICS, format_p, format_significance, reference_label
from ml_core.setups import VERSION as SETUPS_VERSION

HERE = Path(__file__).resolve().parent
# Where each input of the page is among a job's stage outputs: (stage folder, file name).
STAGE_FILES = {
    "report": ("evaluate", "report.json"),
    "history": ("distill", "history.json"),
    "filter_summary": ("filter", "filter.json"),
}
# Metrics shown in the headline table, in this order; other numeric ones follow.
EXTRA_METRICS = ("ndcg@100", "recall@10")
# Largest per-query changes listed under the chart, each way.
TOP_CHANGES = 5


def metric_name(key: str) -> str:
    return DISPLAY.get(key, key.replace("ndcg", "nDCG").replace("recall", "Recall")
                       .replace("mrr", "MRR"))


@cache
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["metric"] = metric_name
    env.filters["signed"] = lambda value, digits=4: f"{float(value):+.{digits}f}"
    env.filters["fixed"] = lambda value, digits=4: f"{float(value):.{digits}f}"
    return env


@cache
def report_css() -> str:
    """The report's stylesheet (also served to the console as a same-origin file)."""
    return (HERE / "report.css").read_text(encoding="utf-8")


def _style_hash() -> str:
    digest = hashlib.sha256(report_css().encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


def report_csp() -> str:
    """The standalone page's Content-Security-Policy: nothing may load, no script may run, and
    only its own inline stylesheet (pinned by hash) applies."""
    return (f"default-src 'none'; style-src '{_style_hash()}'; img-src data:; "
            "base-uri 'none'; form-action 'none'")


# ---------------------------------------------------------------------------------------------
# Sections: each returns the values its template block needs (None when the report lacks it).


def _verdict(report: Mapping[str, Any]) -> dict[str, Any]:
    gain = float(report.get("gain", {}).get(PRIMARY, 0.0))
    base = report.get("base", {}).get(PRIMARY)
    tuned = report.get("tuned", {}).get(PRIMARY)
    sig = report.get("significance")
    recipe = report.get("recipe") or {}
    min_gain = (recipe.get("evaluation") or {}).get("min_gain")
    noisy = bool(sig) and sig["ci95"][0] <= 0.0 <= sig["ci95"][1]
    if report.get("recommended") == "tuned":
        headline = "Use the tuned model"
        why = (f"It raises nDCG@10 from {base:.4f} to {tuned:.4f} ({gain:+.4f})"
               if base is not None and tuned is not None else f"nDCG@10 gain {gain:+.4f}")
        if noisy:
            why += ", but the gain is within noise: its 95% interval includes 0"
        tone = "hold" if noisy else "good"
    else:
        headline = "Keep the base model"
        tone = "hold"
        if report.get("base_kept"):
            why = ("Training never beat the base model on its dev loss, so the tuned model is "
                   "the base model's own weights")
        elif gain < 0:
            why = f"The tuned model is worse: nDCG@10 {gain:+.4f}"
        elif min_gain is not None:
            why = (f"The tuned model's nDCG@10 gain ({gain:+.4f}) does not exceed the required "
                   f"minimum ({float(min_gain):+.4f})")
        else:
            why = f"The tuned model's nDCG@10 gain ({gain:+.4f}) is too small"
    queries = report.get("base", {}).get("queries")
    judged = ("queries judged by you" if report.get("judgements") == "customer"
              else "held-out synthetic queries")
    where = f"Measured on {queries} {judged}." if queries else ""
    return {"headline": headline, "why": why + ".", "where": where, "tone": tone}


def _numbers(report: Mapping[str, Any]) -> list[dict[str, str]]:
    base = report.get("base", {}).get(PRIMARY)
    tuned = report.get("tuned", {}).get(PRIMARY)
    sig = report.get("significance")
    out = []
    if base is not None:
        out.append({"k": "base nDCG@10", "v": f"{base:.4f}"})
    if tuned is not None:
        out.append({"k": "tuned nDCG@10", "v": f"{tuned:.4f}"})
    if PRIMARY in report.get("gain", {}):
        out.append({"k": "gain", "v": f"{report['gain'][PRIMARY]:+.4f}",
                    "note": format_p(sig["p_value"]) if sig else ""})
    if sig:
        low, high = sig["ci95"]
        out.append({"k": "95% interval", "v": f"[{low:+.4f}, {high:+.4f}]",
                    "note": f"over {sig['queries']} queries"})
    return out


def _metric_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    base, tuned, gain = report.get("base", {}), report.get("tuned", {}), report.get("gain", {})
    names = [m for m in (*METRICS, *EXTRA_METRICS) if m in base and m in tuned]
    names += sorted(m for m in gain if m not in names and m in base and m in tuned)
    return [{"name": m, "base": base[m], "tuned": tuned[m], "gain": gain.get(m)} for m in names]


def _setups(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The retrieval set-ups section (report version 2 on): rows, the best, what chunking buys,
    a bar chart of nDCG@10; None for reports without it or of a layout this page predates."""
    section = report.get("retrievers")
    if not section or not section.get("rows") or section.get("version", 1) > SETUPS_VERSION:
        return None
    best = section.get("best") or {}
    rows = [{**row, "best": row["id"] == best.get("id"),
             "reference": row["id"] == section.get("reference")} for row in section["rows"]]
    chart = charts.grouped_bars(
        [charts.Group(row["label"], (row.get(PRIMARY),)) for row in rows],
        [("nDCG@10", "c-tuned")], scale=1.0)
    names = {row["id"]: row["setup"] for row in rows}
    ties = [names[t] for t in best.get("ties") or [] if t in names]
    return {"section": section, "rows": rows, "best": best, "chart": chart, "ties": ties,
            "against": reference_label(section),
            "tuned_is_base": section.get("reference") == "base-chunks",
            "chunking": section.get("chunking") or {}}


def _interval_chart(report: Mapping[str, Any]) -> Markup | None:
    sig = report.get("significance")
    if not sig or not sig.get("queries"):
        return None
    low, high = sig["ci95"]
    return charts.interval(float(sig["difference"]), float(low), float(high))


def _per_query(report: Mapping[str, Any]) -> dict[str, Any] | None:
    rows = report.get("per_query")
    sig = report.get("significance")
    if not rows and not sig:
        return None
    section: dict[str, Any] = {}
    if rows:
        diffs = {qid: float(r["tuned"]) - float(r["base"]) for qid, r in rows.items()}
        counts = {
            "better": sum(d > charts.SAME for d in diffs.values()),
            "worse": sum(d < -charts.SAME for d in diffs.values()),
            "same": sum(abs(d) <= charts.SAME for d in diffs.values()),
        }
        ranked = sorted(diffs.items(), key=lambda item: (item[1], item[0]))
        if counts["better"] or counts["worse"]:
            section["histogram"] = charts.histogram(list(diffs.values()))
        section["gains"] = [
            {"id": qid, **rows[qid], "diff": d}
            for qid, d in reversed(ranked[-TOP_CHANGES:]) if d > charts.SAME
        ]
        section["losses"] = [
            {"id": qid, **rows[qid], "diff": d} for qid, d in ranked[:TOP_CHANGES]
            if d < -charts.SAME
        ]
    else:
        counts = {k: int(sig[k]) for k in ("better", "worse", "same")}  # type: ignore[index]
    section.update(counts)
    section["total"] = sum(counts.values())
    section["outcomes"] = charts.outcomes(counts["better"], counts["worse"], counts["same"])
    return section


def _per_type(report: Mapping[str, Any]) -> dict[str, Any] | None:
    types = report.get("per_query_type") or {}
    if not types:
        return None
    rows = []
    for name, row in types.items():
        rows.append({
            "name": name,
            "queries": row.get("base", {}).get("queries"),
            "base": row.get("base", {}).get(PRIMARY),
            "tuned": row.get("tuned", {}).get(PRIMARY),
            "gain": row.get("gain", {}).get(PRIMARY),
        })
    groups = [
        charts.Group(r["name"], (r["base"], r["tuned"]),
                     f"{r['queries']} queries" if r["queries"] is not None else "")
        for r in rows
    ]
    chart = charts.grouped_bars(groups, [("base", "c-base"), ("tuned", "c-tuned")])
    return {"rows": rows, "chart": chart}


def _training(history: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not history or not history.get("epochs"):
        return None
    epochs = list(history["epochs"])
    numbers = [int(e["epoch"]) for e in epochs]
    kept = history.get("best_epoch")
    series = [("dev loss", "c-dev", [e.get("dev_loss") for e in epochs])]
    if any(e.get("train_loss") is not None for e in epochs):
        series.append(("train loss", "c-train", [e.get("train_loss") for e in epochs]))
    label = "kept: the base model" if kept == 0 else f"kept: epoch {kept}"
    return {
        "chart": charts.epoch_lines(numbers, series, kept, label),
        "epochs": epochs,
        "kept": kept,
        "trained": max(numbers),
        "steps": history.get("steps"),
        "precision": history.get("precision"),
        "stopped_early": history.get("stopped_early"),
        "base_merge": history.get("base_merge") or 0.0,
    }


def _teacher(
    report: Mapping[str, Any], filter_summary: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    check = report.get("teacher_check")
    before = (filter_summary or {}).get("teacher_check")
    if not check and not before:
        return None
    section: dict[str, Any] = {"margin": TEACHER_MARGIN}
    if check and check.get("queries"):
        better = teacher_is_better(check)
        section["check"] = check
        section["better"] = better
        section["chart"] = charts.grouped_bars(
            [charts.Group(metric_name(check.get("metric", PRIMARY)),
                          (check.get("student"), check.get("teacher")))],
            [("student (base model)", "c-base"), ("teacher re-ranking it", "c-teacher")],
        )
    if before and before.get("queries"):
        signals = [("teacher", "c-teacher"), ("student", "c-base"), ("bm25", "c-bm25")]
        shown = [(name, cls) for name, cls in signals if before.get(name) is not None]
        section["before"] = before
        section["before_chart"] = charts.grouped_bars(
            [charts.Group(str(before.get("metric", "mrr")).upper(),
                          tuple(float(before[name]) for name, _ in shown))],
            shown,
        )
    return section


def _filter_counts(filter_summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not filter_summary or "generated" not in filter_summary:
        return None
    return {
        "generated": filter_summary.get("generated"),
        "kept": filter_summary.get("kept"),
        "dropped": filter_summary.get("dropped") or {},
        "by_type": filter_summary.get("by_type") or {},
    }


def _recipe(report: Mapping[str, Any]) -> dict[str, Any] | None:
    recipe = report.get("recipe")
    models = report.get("models") or {}
    if not recipe and not models:
        return None
    recipe = recipe or {}
    generation = recipe.get("generation") or {}
    training = recipe.get("training") or {}
    evaluation = recipe.get("evaluation") or {}
    facts = [
        ("student", models.get("student") or recipe.get("student")),
        ("teacher", models.get("teacher") or recipe.get("teacher")),
        ("generator", models.get("generator") or recipe.get("generator")),
        ("query types", ", ".join(generation.get("query_types") or []) or None),
        ("passages sampled", generation.get("passages")),
        ("loss", training.get("loss")),
        ("epochs (at most)", training.get("max_epochs")),
        ("learning rate", training.get("learning_rate")),
        ("batch size", training.get("batch_size")),
        ("list size", training.get("list_size")),
        ("merged with base", training.get("base_merge")),
        ("minimum gain", evaluation.get("min_gain")),
        ("encoding precision", report.get("encode_precision")),
        ("seed", recipe.get("seed")),
    ]
    return {
        "facts": [(k, v) for k, v in facts if v not in (None, "")],
        "json": json.dumps(recipe, indent=2, sort_keys=True) if recipe else None,
    }


def report_context(
    report: Mapping[str, Any],
    history: Mapping[str, Any] | None = None,
    filter_summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report template shows, computed once (charts as SVG Markup)."""
    return {
        "report": report,
        "verdict": _verdict(report),
        "numbers": _numbers(report),
        "metric_rows": _metric_rows(report),
        "interval_chart": _interval_chart(report),
        "setups": _setups(report),
        "significance": report.get("significance"),
        "per_query": _per_query(report),
        "per_type": _per_type(report),
        "training": _training(history),
        "teacher": _teacher(report, filter_summary),
        "filtered": _filter_counts(filter_summary),
        "warnings": list(report.get("warnings") or []),
        "recipe": _recipe(report),
        "format_p": format_p,
        "format_significance": format_significance,
    }


def report_fragment(
    report: Mapping[str, Any],
    history: Mapping[str, Any] | None = None,
    filter_summary: Mapping[str, Any] | None = None,
    facts: Sequence[tuple[str, str]] = (),
    title: str = "Evaluation report",
) -> Markup:
    """The report's sections as an HTML fragment (the console wraps it in its own layout and
    links report_css() as a stylesheet)."""
    template = _environment().get_template("report_body.html")
    context = report_context(report, history, filter_summary)
    return Markup(template.render(**context, facts=list(facts), title=title))


def render_report_html(
    report: Mapping[str, Any],
    history: Mapping[str, Any] | None = None,
    filter_summary: Mapping[str, Any] | None = None,
    facts: Sequence[tuple[str, str]] = (),
    title: str = "Evaluation report",
) -> str:
    """The whole report as one standalone HTML document (inline stylesheet, inline SVG charts,
    no script, a CSP <meta> that forbids every fetch).

    `report`: the evaluate stage's report.json; `history`: the distill stage's history.json
    (the dev loss chart); `filter_summary`: the filter stage's filter.json (the teacher check
    before filtering, queries kept); `facts`: (label, value) pairs for the header, e.g.
    [("job", job_id), ("model", model_id)].
    """
    body = report_fragment(report, history, filter_summary, facts, title)
    template = _environment().get_template("report_page.html")
    return template.render(
        title=f"{title} - Tailor", body=body, css=Markup(report_css()), csp=report_csp()
    )


def render_report_from_stages(workdir: Path, facts: Sequence[tuple[str, str]] = ()) -> str:
    """The page of a finished job from its stage folders under `workdir` (the worker's view:
    evaluate/report.json, and distill/history.json and filter/filter.json when present)."""
    inputs: dict[str, Any] = {}
    for name, (stage, file_name) in STAGE_FILES.items():
        path = Path(workdir) / stage / file_name
        if path.is_file():
            inputs[name] = json.loads(path.read_text(encoding="utf-8"))
        elif name == "report":
            raise FileNotFoundError(f"{path}: the evaluate stage has not written its report")
    return render_report_html(**inputs, facts=facts)
