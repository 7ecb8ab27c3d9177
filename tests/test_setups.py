"""The report's retrieval set-ups: BM25, hybrid and whole-document rows on a real tiny student
and real BM25, checked against the retrievers they claim to be."""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from rich.console import Console
from tailor_client.display import report_view

from app.reports import render_report_html
from ml_core.evaluation import (
    evaluate_retriever,
    first_stage_documents,
    metrics_from_rankings,
    paired_difference,
)
from ml_core.passages import chunk_passages
from ml_core.records import Passage, Query
from ml_core.registry import ModelRegistry
from ml_core.report import report_lines, setup_lines
from ml_core.retrieval import BM25Index, reciprocal_rank_fusion
from ml_core.setups import RRF_K, DenseModel, compare_setups, whole_document_vectors
from ml_core.student import Student
from tests.report_samples import sample_report

COMMON = ("river flow pressure wing heat layer surface velocity boundary model theory "
          "measured results shock plate").split()


def _lexical_corpus(n: int = 24, seed: int = 3) -> tuple[list[Passage], list[Query], dict]:
    """Documents of shared words, each with one keyword of its own; each query names one
    document's keyword among shared words. BM25 finds every one first; a random-weight dense
    model cannot."""
    rng = random.Random(seed)
    documents, queries, qrels = [], [], {}
    for i in range(n):
        keyword = f"kw{i}x{rng.randrange(10**6)}"
        words = [rng.choice(COMMON) for _ in range(rng.randrange(2, 100))]
        words.insert(rng.randrange(len(words)), keyword)
        documents.append(Passage(id=f"d{i}", text=" ".join(words), title=""))
        queries.append(Query(id=f"q{i}", text=f"{rng.choice(COMMON)} {keyword} "
                                              f"{rng.choice(COMMON)}"))
        qrels[f"q{i}"] = {f"d{i}": 1}
    return documents, queries, qrels


@pytest.fixture(scope="module")
def student(registry: ModelRegistry) -> Student:
    model = Student.load(registry.path("tiny-student"))
    model.encode_precision = "fp32"
    return model


@pytest.fixture(scope="module")
def other_student(registry: ModelRegistry) -> Student:
    """The tiny student with its weights moved: a "tuned" model that ranks differently."""
    import torch

    model = Student.load(registry.path("tiny-student"))
    model.encode_precision = "fp32"
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def _setup(student: Student, documents: list[Passage], chunk_tokens: int = 32):
    passages = chunk_passages(documents, student.tokenizer, chunk_tokens, 8,
                              reserved_tokens=student.prefix_tokens("passage"))
    vectors = student.encode_passages(passages, batch_size=16)
    return passages, vectors


def test_bm25_wins_a_lexical_corpus_and_every_row_is_the_retriever_it_names(
    student: Student,
) -> None:
    documents, queries, qrels = _lexical_corpus()
    passages, vectors = _setup(student, documents)
    chunked = {p.parent_id for p in passages if p.parent_id}
    assert 0 < len(chunked) < len(documents)
    section = compare_setups([DenseModel("base", student, vectors, student.max_seq_length)],
                             passages, documents, queries, qrels, chunk_tokens=32,
                             chunk_overlap_tokens=8)
    rows = {row["id"]: row for row in section["rows"]}
    assert list(rows) == ["bm25", "base-whole", "base-chunks", "base+bm25-whole",
                          "base+bm25-chunks"]
    assert section["reference"] == "base-chunks" and section["queries"] == len(queries)
    # Only the chunked documents are encoded again, whole.
    assert section["chunked_documents"] == section["encoded_documents"] == len(chunked)

    # BM25 puts every keyword's document first; the tiny dense model does not.
    assert rows["bm25"]["ndcg@10"] == pytest.approx(1.0)
    assert rows["base-chunks"]["ndcg@10"] < 0.9
    best = section["best"]
    assert best["id"] == "bm25" and best["setup"] == "BM25 on whole documents"
    assert best["difference"] > 0 and best["ci95"][0] > 0 and not best["within_noise"]
    assert "base-chunks" not in best["ties"] and "base-whole" not in best["ties"]

    # The chunk row is exactly the report's base row (the same search, max over chunks).
    base = evaluate_retriever(student, passages, queries, qrels, passage_vectors=vectors)
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        assert rows["base-chunks"][metric] == pytest.approx(base[metric])

    # The hybrid row is RRF (k=60) of that dense ranking and BM25, recomputed independently.
    dense = first_stage_documents(student, passages, queries, 100, vectors)
    _, bm25_ids = BM25Index(documents).search([q.text for q in queries], 100)
    fused = {q.id: reciprocal_rank_fusion([dense[q.id], ids], RRF_K)[:100]
             for q, ids in zip(queries, bm25_ids, strict=True)}
    expected = metrics_from_rankings(fused, qrels, keep_per_query=True)
    assert rows["base+bm25-chunks"]["ndcg@10"] == pytest.approx(expected["ndcg@10"])
    assert rows["base+bm25-chunks"]["setup"] == (
        "hybrid: base + BM25, RRF k=60, chunks of 32 tokens, max over chunks")
    # Each row's interval is paired against the reference on the same queries.
    versus = paired_difference(base["per_query"], expected["per_query"])
    assert rows["base+bm25-chunks"]["vs_reference"]["ci95"] == pytest.approx(versus["ci95"])
    assert "vs_reference" not in rows["base-chunks"]

    # The text the CLI's demo prints and the page name the same best set-up and rows.
    text = "\n".join(report_lines({**sample_report(queries=40), "retrievers": section}))
    assert "best set-up: BM25 on whole documents (nDCG@10 1.0000" in text
    assert re.search(r"hybrid: base \+ BM25, RRF k=60, chunks of 32 tokens, max over chunks\s+"
                     + f"{rows['base+bm25-chunks']['ndcg@10']:.4f}", text)
    html = render_report_html({**sample_report(queries=40), "version": 2,
                               "retrievers": section})
    assert "Best here: <b>BM25 on whole documents</b>" in html
    assert '<tr class="best"><td>BM25 on whole documents (best)</td>' in html
    # The bar chart: well-formed SVG with one bar per row, titled with the row and its score.
    chart = next(ET.fromstring(svg) for svg in re.findall(r"<svg\b.*?</svg>", html, re.S)
                 if "BM25, chunks" in svg)
    bars = [t.text for t in chart.iter("{http://www.w3.org/2000/svg}title")][1:]
    assert bars == [f"nDCG@10: {row['ndcg@10']:.4f}" for row in section["rows"]]
    # The CLI's `jobs report` table: every row with its figures, the best marked.
    console = Console(record=True, width=240)
    console.print(report_view({**sample_report(queries=40), "retrievers": section}, "job_1"))
    shown = console.export_text()
    assert "Retrieval set-ups" in shown and "BM25 on whole documents  (best)" in shown
    assert "Best set-up: BM25 on whole documents (nDCG@10 1.0000" in shown
    for row in section["rows"]:
        assert row["setup"] in shown and f"{row['ndcg@10']:.4f}" in shown
    low, high = rows["base+bm25-chunks"]["vs_reference"]["ci95"]
    assert f"[{low:+.4f}, {high:+.4f}]" in shown


def test_chunks_find_what_a_whole_document_cut_at_the_models_length_never_sees(
    student: Student,
) -> None:
    """Each query is a passage from the end of its long document, past where the model cuts a
    whole document: max over chunks finds it, the whole document's vector cannot."""
    rng = random.Random(5)
    documents, queries, qrels = [], [], {}
    for i in range(12):
        head = " ".join(rng.choice(COMMON) for _ in range(160))
        tail = " ".join(rng.choice(COMMON) for _ in range(12))
        documents.append(Passage(id=f"d{i}", text=f"{head} {tail}", title=""))
        queries.append(Query(id=f"q{i}", text=tail))
        qrels[f"q{i}"] = {f"d{i}": 1}
    short = Passage(id="s0", text="river flow", title="")
    documents.append(short)
    passages, vectors = _setup(student, documents)
    section = compare_setups([DenseModel("base", student, vectors, student.max_seq_length)],
                             passages, documents, queries, qrels, chunk_tokens=32,
                             chunk_overlap_tokens=8)
    rows = {row["id"]: row for row in section["rows"]}
    assert section["chunked_documents"] == 12 and section["encoded_documents"] == 12
    assert rows["base-chunks"]["ndcg@10"] > rows["base-whole"]["ndcg@10"]
    chunking = section["chunking"]["base"]
    assert chunking["difference"] == pytest.approx(
        rows["base-chunks"]["ndcg@10"] - rows["base-whole"]["ndcg@10"])
    assert chunking["better"] > chunking["worse"]
    assert rows["base-whole"]["setup"] == (
        f"base, whole documents cut at {student.max_seq_length} tokens")

    # Whole-document vectors: an unchunked document reuses its passage's vector; a chunked one
    # is the model's vector of the whole text, cut at its length.
    whole, encoded = whole_document_vectors(student, passages, documents, vectors)
    assert encoded == 12
    row = next(i for i, p in enumerate(passages) if p.id == "s0")
    assert np.array_equal(whole[-1], vectors[row])
    direct = student.encode_passages(documents[:1])
    assert np.allclose(whole[0], direct[0], atol=1e-5)


def test_without_whole_documents_no_document_is_encoded_whole_and_the_report_says_so(
    student: Student, other_student: Student,
) -> None:
    """evaluation.whole_documents off (the quick preset): BM25 and each model on chunks, alone
    and fused, the same figures as with it on; no whole rows, and no claim that no document
    was long enough for one."""
    documents, queries, qrels = _lexical_corpus()
    passages, vectors = _setup(student, documents)
    tuned_vectors = other_student.encode_passages(passages, batch_size=16)
    models = [DenseModel("base", student, vectors, student.max_seq_length),
              DenseModel("tuned", other_student, tuned_vectors, student.max_seq_length)]
    both = compare_setups(models, passages, documents, queries, qrels, chunk_tokens=32,
                          chunk_overlap_tokens=8)
    section = compare_setups(models, passages, documents, queries, qrels, chunk_tokens=32,
                             chunk_overlap_tokens=8, whole_documents=False)
    rows = {row["id"]: row for row in section["rows"]}
    assert list(rows) == ["bm25", "base-chunks", "base+bm25-chunks", "tuned-chunks",
                          "tuned+bm25-chunks"]
    assert section["encoded_documents"] == 0 and section["chunked_documents"] > 0
    assert section["chunking"] == {} and section["whole_gain"] is None
    assert section["whole_documents"] is False and both["whole_documents"] is True
    full = {row["id"]: row for row in both["rows"]}
    for rid, row in rows.items():
        assert row["ndcg@10"] == pytest.approx(full[rid]["ndcg@10"])
    text = "\n".join(report_lines({**sample_report(queries=40), "retrievers": section}))
    assert "whole-document rows left out (evaluation.whole_documents off)" in text
    assert "chunking (" not in text
    html = render_report_html({**sample_report(queries=40), "version": 2,
                               "retrievers": section})
    assert "did not encode documents whole" in html
    assert "No document is longer than a chunk" not in html
    console = Console(record=True, width=240)
    console.print(report_view({**sample_report(queries=40), "retrievers": section}, "job_1"))
    shown = console.export_text()
    assert "Whole-document rows left out (evaluation.whole_documents off)" in shown
    assert "Chunking (" not in shown


def test_every_model_gets_whole_rows_and_tuning_is_paired_on_whole_documents(
    student: Student, other_student: Student,
) -> None:
    """Base and tuned each get a whole-document row; whole_gain pairs them on whole documents."""
    rng = random.Random(7)
    documents, queries, qrels = [], [], {}
    for i in range(10):
        text = " ".join(rng.choice(COMMON) for _ in range(90))
        documents.append(Passage(id=f"d{i}", text=text, title=""))
        queries.append(Query(id=f"q{i}", text=" ".join(text.split()[3:9])))
        qrels[f"q{i}"] = {f"d{i}": 1}
    passages, base_vectors = _setup(student, documents)
    tuned_vectors = other_student.encode_passages(passages)
    per_query: dict[str, dict[str, float]] = {}
    section = compare_setups(
        [DenseModel("base", student, base_vectors, student.max_seq_length),
         DenseModel("tuned", other_student, tuned_vectors, other_student.max_seq_length)],
        passages, documents, queries, qrels, chunk_tokens=32, chunk_overlap_tokens=8,
        per_query=per_query)
    rows = {row["id"]: row for row in section["rows"]}
    # Every row's per-query nDCG@10 (what pairs set-ups across jobs): one score per judged
    # query, averaging to the row's own figure, and what its interval against the reference
    # pairs.
    assert set(per_query) == set(rows)
    for rid, scores in per_query.items():
        assert set(scores) == set(qrels)
        assert np.mean(list(scores.values())) == pytest.approx(rows[rid]["ndcg@10"])
        if rid != section["reference"]:
            assert rows[rid]["vs_reference"] == paired_difference(
                per_query[section["reference"]], scores)
    assert {"base-whole", "tuned-whole", "base+bm25-whole", "tuned+bm25-whole"} <= set(rows)
    assert section["encoded_documents"] == 2 * section["chunked_documents"] > 0
    assert set(section["chunking"]) == {"base", "tuned"}
    gain = section["whole_gain"]
    assert gain["models"] == ["base", "tuned"]
    assert gain["difference"] == pytest.approx(
        rows["tuned-whole"]["ndcg@10"] - rows["base-whole"]["ndcg@10"])
    lines = "\n".join(setup_lines({"retrievers": section}))
    assert "on whole documents, tuned - base" in lines
    html = render_report_html({**sample_report(queries=40), "retrievers": section})
    assert "On whole documents, tuned against base" in html


def test_without_chunked_documents_there_is_no_whole_row(student: Student) -> None:
    documents = [Passage(id=f"d{i}", text=f"note {i} on {COMMON[i]} and {COMMON[i + 1]}",
                         title="") for i in range(6)]
    queries = [Query(id=f"q{i}", text=COMMON[i]) for i in range(6)]
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(6)}
    passages, vectors = _setup(student, documents)
    section = compare_setups([DenseModel("base", student, vectors, 128),
                              DenseModel("tuned", student, vectors, 128)],
                             passages, documents, queries, qrels, chunk_tokens=32,
                             chunk_overlap_tokens=8)
    assert [row["id"] for row in section["rows"]] == [
        "bm25", "base-chunks", "base+bm25-chunks", "tuned-chunks", "tuned+bm25-chunks"]
    assert section["reference"] == "tuned-chunks" and section["chunking"] == {}
    # The same model under both names: a tie goes to the reference, never to a copy of it.
    tuned = next(r for r in section["rows"] if r["id"] == "base-chunks")
    assert tuned["vs_reference"]["difference"] == 0.0
    best = section["best"]
    if best["ndcg@10"] == tuned["ndcg@10"]:
        assert best["id"] == "tuned-chunks"
    # Identical scores under two names: whichever is best, its twin is as good within noise.
    twin = best["id"].replace("tuned", "base") if "tuned" in best["id"] else \
        best["id"].replace("base", "tuned")
    if best["id"] != "bm25":
        assert twin in best["ties"]
    for tie in section["best"]["ties"]:  # each tie's interval against the best reaches 0
        row = next(r for r in section["rows"] if r["id"] == tie)
        assert row["ndcg@10"] <= section["best"]["ndcg@10"]
    html = render_report_html({**sample_report(queries=40), "retrievers": section})
    assert "no whole-document row" in html


def test_a_best_that_is_the_reference_itself_is_said_without_a_difference(
    student: Student,
) -> None:
    documents, queries, qrels = _lexical_corpus(n=8)
    passages, vectors = _setup(student, documents)
    section = compare_setups([DenseModel("tuned", student, vectors, student.max_seq_length)],
                             passages, documents, queries, qrels, chunk_tokens=32,
                             chunk_overlap_tokens=8)
    reference = next(r for r in section["rows"] if r["id"] == "tuned-chunks")
    # The shape compare_setups gives a reference that wins (no difference against itself).
    section["best"] = {"id": "tuned-chunks", "setup": reference["setup"],
                       "ndcg@10": reference["ndcg@10"], "reference": True, "ties": ["bm25"]}
    report = {**sample_report(queries=40), "version": 2, "retrievers": section}
    text = "\n".join(report_lines(report))
    assert (f"best set-up: tuned, chunks of 32 tokens, max over chunks (nDCG@10 "
            f"{reference['ndcg@10']:.4f})") in text
    assert "as good within noise: BM25 on whole documents" in text
    html = render_report_html(report)
    assert "Best here: <b>tuned, chunks of 32 tokens, max over chunks</b>" in html
    assert "As good within noise" in html
    console = Console(record=True, width=240)
    console.print(report_view(report))
    assert "Best set-up: tuned, chunks of 32 tokens, max over chunks (nDCG@10" in \
        console.export_text()
