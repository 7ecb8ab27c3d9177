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


def test_variants_reuse_the_shared_stages_they_agree_on(tmp_path, capsys, model_store, monkeypatch):
    """infonce reuses prepare/generate/filter; fused (other candidate settings) re-filters only."""
    from bench import quality
    from ml_core.registry import ModelRegistry
    from tests.test_pipeline import DEMO, TINY_RECIPE

    data = tmp_path / "data" / "cranfield"
    (data / "qrels").mkdir(parents=True)
    corpus_lines = (DEMO / "corpus.jsonl").read_text().splitlines()[:60]
    (data / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    ids = [json.loads(line)["_id"] for line in corpus_lines[:3]]
    (data / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"flow over a wing {i}"}) + "\n"
                for i in range(3))
    )
    (data / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{d}\t1\n" for i, d in enumerate(ids))
    )
    recipe = {**TINY_RECIPE, "generation": {**TINY_RECIPE["generation"], "passages": 20}}
    monkeypatch.setattr(quality, "DATASETS_ROOT", tmp_path / "data")
    result = quality.run_dataset("cranfield", "default", ["listwise", "infonce", "fused"],
                                 tmp_path / "work", ModelRegistry(model_store), recipe)
    printed = capsys.readouterr().out
    blocks = {block.split("\n", 1)[0]: block for block in printed.split("[cranfield] ")[1:]}
    reused = {variant: {line.split()[0] for line in block.splitlines()[1:] if "(reused)" in line}
              for variant, block in blocks.items()}
    assert reused == {"listwise": set(), "infonce": {"prepare", "generate", "filter"},
                      "fused": {"prepare", "generate"}}
    assert set(result["rows"]) >= {"base", "listwise", "infonce", "fused"}
