"""The base-vs-tuned table of an evaluation report, and its retrieval set-ups, as text (shared
by the CLI and the demo)."""

from __future__ import annotations

from typing import Any

# report.json's layout: 2 added "retrievers" (ml_core.setups); a report without "version" is 1.
REPORT_VERSION = 2
METRICS = ("ndcg@10", "recall@100", "mrr@10")
# How the metrics are spelled for people (the report's keys stay lower case).
DISPLAY = {"ndcg@10": "nDCG@10", "recall@100": "Recall@100", "mrr@10": "MRR@10"}


def format_p(p_value: float) -> str:
    """"p = 0.123" for people, "p < 0.001" where three decimals would print 0 (the
    randomization test's smallest p is 1 / (resamples + 1), never 0)."""
    return "p < 0.001" if p_value < 0.0005 else f"p = {p_value:.3f}"


def format_significance(sig: dict[str, Any]) -> str:
    """"95% interval [low, high], p = ..." of a paired_difference result."""
    low, high = sig["ci95"]
    return f"95% interval [{low:+.4f}, {high:+.4f}], {format_p(sig['p_value'])}"


def report_lines(report: dict[str, Any]) -> list[str]:
    """Lines of text: which judgements, base / tuned / gain per metric, how sure the gain is
    (when the report has it), recommendation, warnings."""
    metrics = [m for m in METRICS if m in report["base"]]
    queries = report["base"].get("queries", "?")
    lines = [f"evaluation on {report['judgements']} judgements ({queries} queries)"]
    if report.get("excluded_trained_queries"):
        lines.append(f"left out: {report['excluded_trained_queries']} judged queries that were "
                     "also training or example queries")
    lines.append(f"{'model':<10}" + "".join(f"{DISPLAY[m]:>12}" for m in metrics))
    for row in ("base", "tuned"):
        lines.append(f"{row:<10}" + "".join(f"{report[row][m]:>12.4f}" for m in metrics))
    lines.append(f"{'gain':<10}" + "".join(f"{report['gain'][m]:>+12.4f}" for m in metrics))
    sig = report.get("significance")
    if sig:
        metric = DISPLAY.get(sig["metric"], sig["metric"])
        lines.append(
            f"{metric} gain: {format_significance(sig)} (paired over {sig['queries']} queries: "
            f"{sig['better']} better, {sig['worse']} worse)"
        )
    lines.append(f"recommended: {report['recommended']}")
    lines.extend(setup_lines(report))
    lines.extend(f"warning: {warning}" for warning in report.get("warnings", []))
    return lines


def reference_label(section: dict[str, Any]) -> str:
    """What the set-ups' differences are against, for people: "tuned" (or "base" where
    training kept the base model)."""
    return str(section.get("reference", "tuned")).split("-")[0]


def setup_lines(report: dict[str, Any]) -> list[str]:
    """The report's retrieval set-ups (BM25, hybrid, whole documents) as lines of text: one row
    each with nDCG@10, Recall@100 and its difference against the reference with the 95%
    interval, then the best set-up and what chunking buys; no lines for a report without them
    (reports before version 2)."""
    section = report.get("retrievers")
    if not section or not section.get("rows"):
        return []
    against = reference_label(section)
    lines = [f"retrieval set-ups on the same {section.get('queries', '?')} queries "
             f"(difference in nDCG@10 against {against} on chunks, 95% interval):"]
    width = max(len(row["setup"]) for row in section["rows"])
    lines.append(f"  {'set-up':<{width}}{'nDCG@10':>10}{'R@100':>9}  vs {against}")
    for row in section["rows"]:
        versus = row.get("vs_reference")
        diff = ("(reference)" if versus is None else
                f"{versus['difference']:+.4f} [{versus['ci95'][0]:+.4f}, {versus['ci95'][1]:+.4f}]")
        lines.append(f"  {row['setup']:<{width}}{row['ndcg@10']:>10.4f}"
                     f"{row.get('recall@100', float('nan')):>9.4f}  {diff}")
    best = section.get("best") or {}
    if best:
        line = f"best set-up: {best['setup']} (nDCG@10 {best['ndcg@10']:.4f}"
        if not best.get("reference"):
            low, high = best["ci95"]
            line += (f", {best['difference']:+.4f} against {against} on chunks, 95% interval "
                     f"[{low:+.4f}, {high:+.4f}]" + (", within noise" if best.get("within_noise")
                                                     else ""))
        lines.append(line + ")")
        names = {row["id"]: row["setup"] for row in section["rows"]}
        if best.get("ties"):
            lines.append("as good within noise: " + "; ".join(names[t] for t in best["ties"]))
    for model, sig in (section.get("chunking") or {}).items():
        lines.append(f"chunking ({model}): {sig['difference']:+.4f} nDCG@10 over whole documents, "
                     f"{format_significance(sig)}")
    if section.get("whole_documents") is False and section.get("chunked_documents"):
        lines.append("whole-document rows left out (evaluation.whole_documents off): no figure "
                     "for what chunking buys")
    gain = section.get("whole_gain")
    if gain:
        first, last = gain["models"]
        lines.append(f"on whole documents, {last} - {first}: {gain['difference']:+.4f} nDCG@10, "
                     f"{format_significance(gain)}")
    return lines
