"""Bulk embedding in ml_core: how documents map to rows, that rows equal the served vectors,
and that a run resumes after its last finished shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ml_core.bulk_embed import BulkSettings, embed_corpus, finished_shards, load_vectors
from ml_core.records import Passage

LONG = " ".join(["boundary layer transition on a swept wing at high mach numbers"] * 40)


@pytest.fixture(scope="module")
def student(model_store: Path):  # noqa: ANN201
    from ml_core.student import Student

    return Student.load(model_store / "tiny-student")


def _documents() -> list[Passage]:
    docs = [Passage(id=f"d{i}", title=f"wing {i}", text=f"lift and drag of wing number {i}")
            for i in range(7)]
    docs.insert(3, Passage(id="long", title="a long one", text=LONG))
    return docs


def _settings(**overrides: object) -> BulkSettings:
    values = {"model": "tiny-student", "model_sha256": "m", "corpus_sha256": "c",
              "shard_documents": 3} | overrides
    return BulkSettings(**values)  # type: ignore[arg-type]


def _served(student, texts: list[str], kind: str) -> np.ndarray:  # noqa: ANN001
    """What /v1/embed computes for `texts` (one request: tokenize, then encode the ids)."""
    tokenizer = student.serving_tokenizer()
    ids = [e.ids for e in tokenizer.encode_batch(student.encoding_texts(texts, kind))]
    return np.concatenate([student.encode_token_ids([row]) for row in ids])


def test_documents_map_to_rows_and_rows_equal_the_served_vectors(
    student, tmp_path: Path  # noqa: ANN001
) -> None:
    docs = _documents()
    manifest = embed_corpus(iter(docs), len(docs), student, _settings(), tmp_path,
                            token_budget=512)
    vectors, rows = load_vectors_from(tmp_path, manifest)
    assert manifest["complete"] and manifest["documents"] == 8
    assert [s["documents"] for s in manifest["shards"]] == [3, 3, 2]
    # The long document is split as training splits it: ids <doc>#k, spans into its text.
    chunks = [r for r in rows if r["document_id"] == "long"]
    assert len(chunks) > 1 and [r["id"] for r in chunks] == [f"long#{k}"
                                                             for k in range(len(chunks))]
    assert chunks[0]["start"] == 0 and chunks[-1]["end"] == len(LONG)
    assert all(r["start"] < r["end"] for r in chunks)
    assert [r["id"] for r in rows if r["document_id"] != "long"] == [
        d.id for d in docs if d.id != "long"]
    assert manifest["rows"] == len(rows) == len(vectors) and manifest["truncated"] == 0
    # Each row is the vector /v1/embed gives its text ("title text", the chunk for a chunk).
    texts = []
    for row in rows:
        doc = next(d for d in docs if d.id == row["document_id"])
        text = doc.text[row["start"]:row["end"]] if "start" in row else doc.text
        texts.append(f"{doc.title} {text}")
    np.testing.assert_allclose(vectors, _served(student, texts, "passage"), atol=1e-5)


def load_vectors_from(folder: Path, manifest: dict) -> tuple[np.ndarray, list[dict]]:
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return load_vectors(folder)


def test_truncate_keeps_one_row_per_document_and_says_which_were_cut(
    student, tmp_path: Path  # noqa: ANN001
) -> None:
    docs = _documents()
    manifest = embed_corpus(iter(docs), len(docs), student,
                            _settings(long_documents="truncate", input_type="query"), tmp_path,
                            token_budget=64)
    vectors, rows = load_vectors_from(tmp_path, manifest)
    assert [r["id"] for r in rows] == [d.id for d in docs]
    assert [r.get("truncated", False) for r in rows] == [d.id == "long" for d in docs]
    assert manifest["truncated"] == 1
    texts = [f"{d.title} {d.text}" for d in docs]
    np.testing.assert_allclose(vectors, _served(student, texts, "query"), atol=1e-5)


def test_a_resumed_run_skips_the_finished_shards(student, tmp_path: Path) -> None:  # noqa: ANN001
    docs = _documents()
    stored: list[dict] = []
    first = embed_corpus(iter(docs), len(docs), student, _settings(), tmp_path / "a",
                         token_budget=512, on_shard=lambda shard, m: stored.append(m))
    # A run killed after its first shard: its stored manifest vouches for shard 0 only.
    done = finished_shards(stored[0], _settings())
    assert [s.index for s in done] == [0]
    encoded: list[str] = []
    second = embed_corpus(iter(docs), len(docs), student, _settings(), tmp_path / "b",
                          token_budget=512, done=done,
                          progress=lambda fraction, message: encoded.append(message))
    assert second["shards"] == first["shards"]
    assert not any(m.startswith("shard 0:") for m in encoded)
    assert not (tmp_path / "b" / "vectors-00000.npy").exists()
    # Other settings (here the shard size) are another run: nothing is reused.
    assert finished_shards(stored[0], _settings(shard_documents=4)) == []
