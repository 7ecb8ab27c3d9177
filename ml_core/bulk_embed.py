"""Bulk embedding of a whole corpus: vectors in shards, each with the ids of its rows, written
one shard at a time so an interrupted run resumes after its last finished shard.

How a document maps to rows. Documents are read in corpus order, `shard_documents` per shard.
A document that fits the model's length is one row, its id the document's. A longer one, with
`long_documents="chunk"` (the default), is split exactly as Tailor's training and evaluation
split it (`ml_core.passages.chunk_passages`: windows on word boundaries overlapping by 32 tokens,
the title repeated on each): one row per chunk, ids `<document id>#<k>` from 0, each with the
character span `[start, end)` of its text in the document's `text`. With "truncate" it is one
row cut at the model's length, like /v1/embed with `truncate=true`.

Vectors equal /v1/embed's for the same texts: the same prefixes and tokenization
(`Student.serving_tokenizer`), the same encoder call (`Student.encode_token_ids`), float32.

Files per shard k: `vectors-<k>.npy` (float32 [rows, dim], NumPy's format) and `ids-<k>.jsonl`
(one JSON object per row, in row order: id, document_id, and start/end for a chunk; `truncated`
on a row that was cut). `manifest.json` lists the finished shards (counts, each file's bytes and
sha256); it is written after each one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ml_core.records import Passage, ProgressFn, no_progress
from ml_core.registry import file_sha256

InputType = Literal["query", "passage"]
LongDocuments = Literal["chunk", "truncate"]
MANIFEST = "manifest.json"
FORMAT = "tailor-embeddings/1"
# The overlap training uses (CorpusConfig.chunk_overlap_tokens), so rows match its passages.
CHUNK_OVERLAP_TOKENS = 32


@dataclass(frozen=True)
class BulkSettings:
    """What decides a run's rows and files: a stored run with other settings is not resumed."""

    model: str
    model_sha256: str
    corpus_sha256: str
    input_type: InputType = "passage"
    long_documents: LongDocuments = "chunk"
    shard_documents: int = 4096

    def fingerprint(self) -> str:
        """sha256 of these settings."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Shard:
    """One finished shard: its files (names relative to the output folder, with their sizes
    and sha256, so a listing or a check needs only the manifest) and counts."""

    index: int
    vectors: str
    ids: str
    rows: int
    documents: int
    first_document: int
    truncated: int
    bytes: dict[str, int]
    sha256: dict[str, str]

    def names(self) -> tuple[str, str]:
        return self.vectors, self.ids


def shard_names(index: int) -> tuple[str, str]:
    """The vectors and ids file names of shard `index`."""
    return f"vectors-{index:05d}.npy", f"ids-{index:05d}.jsonl"


def document_shards(documents: Iterator[Passage], size: int) -> Iterator[list[Passage]]:
    """Consecutive lists of `size` documents (the last may be shorter)."""
    while batch := list(islice(documents, size)):
        yield batch


def _rows(student: Any, documents: Sequence[Passage], long_documents: LongDocuments,
          kind: InputType) -> tuple[list[Passage], list[dict[str, Any]]]:
    """The passages to encode and each one's row record, in row order."""
    if long_documents == "truncate":
        return list(documents), [{"id": d.id, "document_id": d.id} for d in documents]
    from ml_core.passages import chunk_spans

    spans = chunk_spans(documents, student.tokenizer, student.max_seq_length,
                        CHUNK_OVERLAP_TOKENS, reserved_tokens=student.prefix_tokens(kind))
    passages: list[Passage] = []
    records: list[dict[str, Any]] = []
    for document, cuts in zip(documents, spans, strict=True):
        if cuts is None:
            passages.append(document)
            records.append({"id": document.id, "document_id": document.id})
            continue
        for k, (start, end) in enumerate(cuts):
            chunk_id = f"{document.id}#{k}"
            passages.append(Passage(id=chunk_id, text=document.text[start:end],
                                    title=document.title, parent_id=document.id))
            records.append({"id": chunk_id, "document_id": document.id, "start": start,
                            "end": end})
    return passages, records


def _batches(lengths: Sequence[int], token_budget: int) -> Iterator[list[int]]:
    """Row indices, longest first, in batches whose padded size fits `token_budget`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        # Longest first: the batch's first row sets its padded length.
        if batch and (len(batch) + 1) * lengths[batch[0]] > token_budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def embed_documents(student: Any, documents: Sequence[Passage], input_type: InputType,
                    long_documents: LongDocuments, token_budget: int,
                    progress: ProgressFn = no_progress) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """float32 [rows, dim] vectors of `documents` and the row records (see the module
    docstring); `progress` gets the fraction of rows encoded."""
    passages, records = _rows(student, documents, long_documents, input_type)
    tokenizer = student.serving_tokenizer()
    encodings = tokenizer.encode_batch(student.encoding_texts(passages, input_type))
    ids = [e.ids for e in encodings]
    for record, encoding in zip(records, encodings, strict=True):
        if encoding.overflowing:
            record["truncated"] = True
    vectors = np.zeros((len(ids), student.dim), dtype=np.float32)
    done = 0
    for batch in _batches([len(row) for row in ids], token_budget):
        vectors[batch] = student.encode_token_ids([ids[i] for i in batch])
        done += len(batch)
        progress(done / max(1, len(ids)), f"encoded {done} of {len(ids)} rows")
    return vectors, records


def write_shard(folder: Path, index: int, first_document: int, documents: int,
                vectors: np.ndarray, records: Sequence[Mapping[str, Any]]) -> Shard:
    """Write shard `index`'s two files into `folder` (each via a temporary name)."""
    folder.mkdir(parents=True, exist_ok=True)
    vectors_name, ids_name = shard_names(index)
    tmp = folder / (vectors_name + ".tmp")
    with tmp.open("wb") as out:
        np.save(out, np.ascontiguousarray(vectors, dtype=np.float32))
    tmp.replace(folder / vectors_name)
    tmp = folder / (ids_name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")
    tmp.replace(folder / ids_name)
    truncated = sum(1 for r in records if r.get("truncated"))
    names = (vectors_name, ids_name)
    return Shard(index=index, vectors=vectors_name, ids=ids_name, rows=len(records),
                 documents=documents, first_document=first_document, truncated=truncated,
                 bytes={name: (folder / name).stat().st_size for name in names},
                 sha256={name: file_sha256(folder / name) for name in names})


def manifest(settings: BulkSettings, dim: int, normalized: bool, shards: Sequence[Shard],
             complete: bool) -> dict[str, Any]:
    """The manifest of a run with `shards` finished (`complete` once every document is in)."""
    return {
        "format": FORMAT,
        "fingerprint": settings.fingerprint(),
        "model": settings.model,
        "input_type": settings.input_type,
        "long_documents": settings.long_documents,
        "shard_documents": settings.shard_documents,
        "dim": dim,
        "dtype": "float32",
        "normalized": normalized,
        "complete": complete,
        "documents": sum(s.documents for s in shards),
        "rows": sum(s.rows for s in shards),
        "truncated": sum(s.truncated for s in shards),
        "shards": [asdict(s) for s in shards],
    }


def finished_shards(stored: Mapping[str, Any] | None, settings: BulkSettings) -> list[Shard]:
    """The shards a stored manifest vouches for, when it belongs to a run with these settings
    (else none: the run starts over)."""
    if not stored or stored.get("fingerprint") != settings.fingerprint():
        return []
    return [Shard(**shard) for shard in stored.get("shards", [])]


def embed_corpus(
    documents: Iterator[Passage],
    total_documents: int,
    student: Any,
    settings: BulkSettings,
    folder: Path,
    *,
    token_budget: int,
    done: Sequence[Shard] = (),
    on_shard: Callable[[Shard, dict[str, Any]], None] | None = None,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Embed every document into shards under `folder`, skipping the shards in `done` (an
    earlier run's, same settings); after each shard, `on_shard(shard, manifest)` (the worker
    stores its files, then the manifest). Returns the final manifest."""
    finished = {shard.index: shard for shard in done}
    shards: list[Shard] = [finished[i] for i in sorted(finished)]
    normalized = bool(student.spec.normalize)
    first = 0
    total = max(1, total_documents)
    for index, batch in enumerate(document_shards(documents, settings.shard_documents)):
        if index in finished:
            first += len(batch)
            continue

        def report(fraction: float, message: str, start: int = first, size: int = len(batch),
                   index: int = index) -> None:
            progress((start + fraction * size) / total, f"shard {index}: {message}")

        vectors, records = embed_documents(student, batch, settings.input_type,
                                           settings.long_documents, token_budget, report)
        shard = write_shard(folder, index, first, len(batch), vectors, records)
        shards.append(shard)
        first += len(batch)
        if on_shard is not None:
            on_shard(shard, manifest(settings, student.dim, normalized, shards, complete=False))
    return manifest(settings, student.dim, normalized, shards, complete=True)


def load_vectors(folder: Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every row of a finished run in `folder`: vectors [rows, dim] and their records."""
    stored = json.loads((Path(folder) / MANIFEST).read_text())
    vectors, records = [], []
    for shard in stored["shards"]:
        vectors.append(np.load(Path(folder) / shard["vectors"]))
        lines = (Path(folder) / shard["ids"]).read_text(encoding="utf-8").splitlines()
        records += [json.loads(line) for line in lines]
    dim = int(stored["dim"])
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), records
