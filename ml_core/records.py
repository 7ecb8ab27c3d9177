"""The records that flow between stages, and how each is written to disk (JSON lines)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# A stage reports progress as (fraction of this stage done in [0, 1], short message).
# The worker's callback may raise to stop the stage (cancellation); stages must let it propagate.
ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """A ProgressFn that ignores reports."""


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrievable unit: a whole document or one chunk of it (parent_id names the document)."""

    id: str
    text: str
    title: str = ""
    parent_id: str = ""

    @property
    def document_id(self) -> str:
        return self.parent_id or self.id


@dataclass(frozen=True, slots=True)
class Query:
    """A query with its source passage (synthetic) or without one (customer judgements)."""

    id: str
    text: str
    query_type: str = ""
    source_id: str = ""  # passage id the query was generated from
    split: str = ""  # "train" | "dev" | "test" for synthetic queries


@dataclass(frozen=True, slots=True)
class ScoredList:
    """One query's candidate list after teacher scoring (the unit of training and filtering).

    passage_ids[0] is the positive (the source passage); teacher_scores are normalised to [0, 1]
    and aligned with passage_ids; raw_scores keep the teacher's logits for reports.
    """

    query_id: str
    passage_ids: list[str]
    teacher_scores: list[float]
    raw_scores: list[float] = field(default_factory=list)


T = TypeVar("T")


def write_jsonl(path: Path, records: Iterable[Any]) -> int:
    """Write dataclass records (or dicts) as JSON lines; returns the count. Writes atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            row = record if isinstance(record, dict) else asdict(record)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def read_jsonl(path: Path, cls: type[T]) -> Iterator[T]:
    """Read JSON lines written by write_jsonl back into `cls` records."""
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield cls(**json.loads(line))
