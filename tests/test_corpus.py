"""Corpus reading (precise errors), validation, hygiene, chunking and sampling."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from ml_core.config import CorpusConfig
from ml_core.corpus import CorpusError, iter_corpus, read_qrels, read_queries, validate_corpus
from ml_core.passages import (
    chunk_passages,
    clean_passages,
    find_containers,
    normalise,
    sample_passages,
)
from ml_core.records import Passage

DOCS = [
    {"_id": "d1", "title": "Wings", "text": "Lift on a swept wing at transonic speed."},
    {"id": "d2", "text": "Heat transfer in laminar boundary layers."},
]


def write_lines(path: Path, lines: list[str], compress: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def error_for(tmp_path: Path, lines: list[str]) -> CorpusError:
    path = write_lines(tmp_path / "corpus.jsonl", lines)
    with pytest.raises(CorpusError) as caught:
        list(iter_corpus(path))
    return caught.value


def test_reads_plain_and_gzip_by_content_not_name(tmp_path: Path) -> None:
    lines = [json.dumps(d) for d in DOCS]
    plain = write_lines(tmp_path / "corpus.jsonl.gz", lines)  # misleading name
    packed = write_lines(tmp_path / "corpus.jsonl", lines, compress=True)
    expected = [Passage("d1", DOCS[0]["text"], "Wings"), Passage("d2", DOCS[1]["text"])]
    assert list(iter_corpus(plain)) == expected
    assert list(iter_corpus(packed)) == expected


@pytest.mark.parametrize(
    ("bad_line", "field", "message"),
    [
        ('{"_id": "d3", "text": "unterminated', None, "invalid JSON"),
        ('["d3", "a list"]', None, "expected a JSON object"),
        ('{"_id": "d3"}', "text", "missing"),
        ('{"_id": "", "text": "an empty id"}', "_id", "empty"),
        ('{"_id": "d3", "text": 42}', "text", "must be a string, got int"),
        ('{"_id": "d3", "title": ["x"], "text": "ok text here"}', "title", "must be a string"),
        ('{"text": "no id at all"}', "_id", "missing"),
        ('{"_id": 7.5, "text": "fractional id"}', "_id", "must be a string, got float"),
        ('{"_id": "d1", "text": "same id again"}', "_id", "first seen on line 1"),
    ],
)
def test_errors_name_file_line_and_field(
    tmp_path: Path, bad_line: str, field: str | None, message: str
) -> None:
    # a blank line before the bad one: line numbers count physical lines
    error = error_for(tmp_path, [json.dumps(DOCS[0]), "", bad_line])
    assert (error.line, error.field) == (3, field)
    assert message in error.message
    assert str(error).startswith(f"{tmp_path / 'corpus.jsonl'}, line 3: ")
    assert error.to_dict()["line"] == 3


def test_empty_and_undecodable_files(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(CorpusError, match="empty corpus"):
        list(iter_corpus(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"_id": "a", "text": "ok text"}\n{"_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="line 2: not valid UTF-8"):
        list(iter_corpus(latin))
    truncated = tmp_path / "cut.jsonl.gz"
    whole = "".join(json.dumps({"_id": f"d{i}", "text": f"text {i}"}) + "\n" for i in range(500))
    truncated.write_bytes(gzip.compress(whole.encode())[:-40])
    with pytest.raises(CorpusError, match="unreadable data"):
        list(iter_corpus(truncated))


@pytest.mark.parametrize("compress", [False, True])
def test_validate_streams_counts_and_hashes_the_stored_file(
    tmp_path: Path, compress: bool
) -> None:
    lines = [json.dumps({"_id": f"d{i}", "text": f"passage number {i}"}) for i in range(3000)]
    path = write_lines(tmp_path / "c.jsonl", lines, compress=compress)
    stats = validate_corpus(path)
    stored = path.read_bytes()
    assert stats.documents == 3000
    assert stats.bytes == len(stored)
    assert stats.sha256 == hashlib.sha256(stored).hexdigest()
    assert stats.compressed is compress
    assert stats.text_bytes == sum(len(line) + 1 for line in lines)


def test_empty_documents_and_numeric_ids_are_accepted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", ['{"_id": 1, "text": "a real passage about wings"}',
                                              '{"_id": "2", "title": "", "text": ""}'])
    passages = list(iter_corpus(path))
    assert [p.id for p in passages] == ["1", "2"]
    kept, report = clean_passages(passages, CorpusConfig())
    assert [p.id for p in kept] == ["1"] and report.too_short == 1


def test_validate_reports_the_first_bad_line(tmp_path: Path) -> None:
    lines = [json.dumps({"_id": f"d{i}", "text": "fine"}) for i in range(10)]
    lines[6] = '{"_id": "d6"}'
    with pytest.raises(CorpusError, match="line 7: field 'text': missing"):
        validate_corpus(write_lines(tmp_path / "c.jsonl", lines, compress=True))


def test_read_queries_and_qrels(tmp_path: Path) -> None:
    queries = write_lines(tmp_path / "queries.jsonl", [
        json.dumps({"_id": "q1", "text": "swept wing lift", "metadata": {}}),
        json.dumps({"_id": "q2", "text": "boundary layer heat"}),
    ])
    assert [(q.id, q.text) for q in read_queries(queries)] == [
        ("q1", "swept wing lift"), ("q2", "boundary layer heat")]
    qrels = write_lines(tmp_path / "qrels.tsv", [
        "query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2\t0", "q2\td2\t2"])
    assert read_qrels(qrels) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 2}}
    headless = write_lines(tmp_path / "headless.tsv", ["q1\td1\t1"], compress=True)
    assert read_qrels(headless) == {"q1": {"d1": 1}}


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("q1\td1", None, "expected 3 tab-separated columns, got 2"),
        ("q1\td1\thigh", "score", "must be an integer"),
        ("\td1\t1", "query-id", "empty"),
        ("q1\td1\t0", "score", "conflicting judgement"),
    ],
)
def test_qrels_errors(tmp_path: Path, line: str, field: str | None, message: str) -> None:
    path = write_lines(tmp_path / "qrels.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", line])
    with pytest.raises(CorpusError) as caught:
        read_qrels(path)
    assert (caught.value.line, caught.value.field) == (3, field)
    assert message in caught.value.message


def test_duplicate_query_ids_are_errors(tmp_path: Path) -> None:
    lines = ['{"_id": "q", "text": "a"}', '{"id": "q", "text": "b"}']
    path = write_lines(tmp_path / "q.jsonl", lines)
    with pytest.raises(CorpusError, match="line 2: field '_id': duplicate id 'q'"):
        read_queries(path)


def test_normalise_strips_case_digits_punctuation_and_compat_forms() -> None:
    assert normalise("The ﬁrst 3 Results: (p < 0.05)!") == "the first results p"


def test_hygiene_drops_short_exact_and_contained_duplicates() -> None:
    passages = [
        Passage("long", "Lift and drag were measured on a swept wing at Mach 0.8 in the tunnel."),
        Passage("short", "too short"),
        Passage("exact", "LIFT and drag were measured on a swept wing at Mach 0.9, in the tunnel!"),
        Passage("inside", "drag were measured on a swept wing"),
        Passage("inside-of-inside", "measured on a swept"),
        Passage("word-boundary", "concatenated swept wing studies"),
        Passage("other", "Heat transfer in laminar boundary layers."),
        Passage("numbers", "12345 67890 !!"),
    ]
    kept, report = clean_passages(passages, CorpusConfig(min_chars=10))
    assert [p.id for p in kept] == ["long", "word-boundary", "other"]
    assert (report.input, report.kept, report.too_short, report.no_words) == (8, 3, 1, 1)
    assert (report.exact_duplicates, report.contained) == (1, 2)
    assert report.replaced_by == {"exact": "long", "inside": "long", "inside-of-inside": "long"}
    assert json.loads(json.dumps(report.to_dict()))["kept"] == 3


def test_hygiene_without_dedupe_only_drops_short_passages() -> None:
    passages = [Passage("a", "same text here"), Passage("b", "same text here"), Passage("c", "x")]
    kept, report = clean_passages(passages, CorpusConfig(min_chars=5, dedupe=False))
    assert [p.id for p in kept] == ["a", "b"] and report.too_short == 1


def test_find_containers_picks_the_longest_container() -> None:
    texts = [["b", "c"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e", "f"], ["c", "b"], ["x"]]
    assert find_containers(texts) == {0: 2, 1: 2}


def test_chunking_splits_long_passages_with_overlap(registry) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(registry.path("tiny-student"))
    words = [f"protein{i % 7} binding in cell number {i}." for i in range(40)]
    long = Passage("doc", " ".join(words), title="Cell study")
    short = Passage("tiny", "a short passage")
    chunks = chunk_passages([long, short], tokenizer, max_tokens=48, overlap=8, reserved_tokens=3)
    assert chunks[-1] == short
    parts = chunks[:-1]
    assert len(parts) > 3
    assert [c.id for c in parts] == [f"doc#{k}" for k in range(len(parts))]
    assert {c.parent_id for c in parts} == {"doc"} and {c.title for c in parts} == {"Cell study"}
    title_tokens = len(tokenizer("Cell study", add_special_tokens=False)["input_ids"])
    for chunk in parts:
        tokens = tokenizer(chunk.text, add_special_tokens=False)["input_ids"]
        assert len(tokens) <= 48 - 2 - 3 - title_tokens
        assert chunk.text in long.text
    for left, right in zip(parts, parts[1:], strict=False):
        # chunks cut on word boundaries and overlap by 1..8 tokens
        left_ids = tokenizer(left.text, add_special_tokens=False)["input_ids"]
        right_ids = tokenizer(right.text, add_special_tokens=False)["input_ids"]
        assert any(left_ids[-m:] == right_ids[:m] for m in range(1, 9))
    assert long.text.startswith(parts[0].text) and long.text.endswith(parts[-1].text)


def test_sampling_is_seeded() -> None:
    passages = [Passage(str(i), f"text {i}") for i in range(100)]
    first = sample_passages(passages, 10, seed=3)
    assert first == sample_passages(passages, 10, seed=3)
    assert first != sample_passages(passages, 10, seed=4)
    assert len({p.id for p in first}) == 10
    assert sample_passages(passages, 500, seed=3) == passages
