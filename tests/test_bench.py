"""bench.quality's merge of per-dataset runs into one table."""

from __future__ import annotations

import json

import pytest

from bench.quality import main, merge_results


def _run(name: str, base: float, tuned: float, threads: str) -> dict:
    rows = {"base": {"ndcg@10": base, "recall@100": 0.9},
            "listwise": {"ndcg@10": tuned, "recall@100": 0.91}}
    return {"preset": "default", "torch_threads": threads,
            "datasets": {name: {"rows": rows, "seconds": {"listwise": {"distill": 10.0}}}}}


def test_merge_keeps_each_dataset_and_each_runs_settings(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_run("cranfield", 0.38, 0.39, "1")))
    second.write_text(json.dumps(_run("scifact-dev", 0.69, 0.71, "2")))
    out = tmp_path / "merged.json"
    assert main(["--merge", str(first), str(second), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["datasets"]) == ["cranfield", "scifact-dev"]
    assert merged["datasets"]["scifact-dev"]["rows"]["listwise"]["ndcg@10"] == 0.71
    assert [run["torch_threads"] for run in merged["runs"]] == ["1", "2"]
    printed = capsys.readouterr().out
    assert "+0.0200" in printed and "+0.0100" in printed


def test_merge_refuses_a_dataset_measured_twice():
    with pytest.raises(SystemExit, match="cranfield"):
        merge_results([_run("cranfield", 0.38, 0.39, "1"), _run("cranfield", 0.38, 0.4, "1")])
