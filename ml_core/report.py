"""The base-vs-tuned table of an evaluation report, as text (shared by the CLI and the demo)."""

from __future__ import annotations

from typing import Any

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
                     "also training queries")
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
    lines.extend(f"warning: {warning}" for warning in report.get("warnings", []))
    return lines
