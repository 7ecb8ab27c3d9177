"""Synthetic query generation: one query per passage per query type, cleaned and deduplicated.

Re-implements step 3 of the recipe of Tamber et al. 2025 (arXiv 2502.19712): an instruction LLM
writes a query of each type for every sampled passage; replies are reduced to a single plausible
query line. Whatever still slips through is the teacher's round-trip filter's job.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ml_core.config import GenerationConfig, QueryType
from ml_core.generation.backends import Conversation, Generator
from ml_core.generation.prompts import EXAMPLES, build_messages
from ml_core.records import Passage, ProgressFn, Query, no_progress

# A query longer than this is cut to it (the prompt asks for under 20 words; a few more are
# tolerated rather than thrown away).
MAX_QUERY_WORDS = 24
MAX_KEY_PHRASES = 5
# Replies that were unusable are asked for again once with another seed: cheap, and it keeps
# the per-type counts even when a small model misfires.
RETRY_ROUNDS = 1

_LABEL = re.compile(
    r"^\s*(?:here(?:'s| is| are)[^:]*:|sure[,!.]?[^:]*:|"
    r"(?:search\s+|user\s+|short\s+|web\s+)?(?:query|question|claim|title|keywords?|"
    r"key\s*phrases?|answer|response|output)\s*\d*\s*[:\-–—]\s*)",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•>#]+|\d+[.)])\s+")
_QUOTES = "\"'“”‘’`*_"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True, slots=True)
class _Request:
    passage: Passage
    query_type: QueryType
    messages: Conversation

    @property
    def length(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


def query_id(query_type: QueryType | str, passage_id: str) -> str:
    """The deterministic id of the query of `query_type` generated from a passage."""
    return f"{QueryType(query_type).value}:{passage_id}"


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# Small generators sometimes repeat a few-shot answer verbatim instead of writing a new query.
_EXAMPLE_QUERIES = frozenset(_normalised(q) for e in EXAMPLES for q in e.queries.values())


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def clean_query(raw: str, query_type: QueryType | str, passage: Passage) -> str | None:
    """The usable query in a raw LLM reply, or None when there is none.

    Keeps the first non-empty line; strips labels ("Query:", "Here is a title:"), bullets and
    surrounding quotes; keeps at most 5 key phrases for keywords and MAX_QUERY_WORDS words
    otherwise. None for empty replies, replies with no letters, copies of the passage's title,
    text or first sentence, and copies of a few-shot example's query.
    """
    query_type = QueryType(query_type)
    lines = [line.strip() for line in raw.replace("\r", "\n").split("\n")]
    # A reply may open with a label line ("Query:") whose content is on the next line.
    text = ""
    for line in lines:
        line = _LABEL.sub("", _BULLET.sub("", line), count=1).strip().strip(_QUOTES).strip()
        if line:
            text = line
            break
    if not text or not re.search(r"[^\W\d_]", text):
        return None
    if query_type == QueryType.KEYWORDS:
        phrases = [p.strip().strip(_QUOTES).strip() for p in re.split(r"[,;]", text)]
        phrases = [p for p in phrases if p][:MAX_KEY_PHRASES]
        text = ", ".join(" ".join(p.split()[:MAX_QUERY_WORDS // 2]) for p in phrases)
    words = text.split()
    if len(words) > MAX_QUERY_WORDS:
        text = " ".join(words[:MAX_QUERY_WORDS])
    text = text.rstrip(" ,;:-")
    norm = _normalised(text)
    if not norm:
        return None
    copies = {_normalised(passage.text), _normalised(_first_sentence(passage.text))}
    if query_type != QueryType.TITLES:
        # A title written from the passage may legitimately match the document's own title.
        copies.add(_normalised(passage.title))
    if norm in copies or norm in _EXAMPLE_QUERIES:
        return None
    return text


def build_requests(
    passages: list[Passage], cfg: GenerationConfig, seed: int
) -> list[_Request]:
    """One chat request per passage per configured query type, in passage-then-type order."""
    requests = []
    for passage in passages:
        for query_type in cfg.query_types:
            # Seeded by (seed, type, passage) so a passage's examples never depend on which other
            # passages were sampled; str seeds are hashed deterministically by random.Random.
            rng = random.Random(f"{seed}:{query_type.value}:{passage.id}")
            # The title would hand the answer to the titles type; other types get it as context.
            title = "" if query_type == QueryType.TITLES else passage.title
            messages = build_messages(passage.text, query_type, cfg.few_shot_examples, rng, title)
            requests.append(_Request(passage, query_type, messages))
    return requests


def generate_queries(
    passages: list[Passage],
    cfg: GenerationConfig,
    generator: Generator,
    seed: int,
    progress: ProgressFn = no_progress,
) -> list[Query]:
    """Synthetic queries: one per passage per type in `cfg.query_types`, minus unusable replies.

    Requests are sorted by prompt length and sent in batches of `cfg.batch_size` (less padding);
    replies that clean to nothing are retried once with another seed. Query ids are
    `<type>:<passage id>`; results come in passage order, then type order. `progress` is called
    after every batch with the fraction done.
    """
    requests = build_requests(passages, cfg, seed)
    answers: dict[int, str] = {}
    pending = list(range(len(requests)))
    # Total batches over all rounds is unknown up front; report against the first round and
    # cap at 1.0 so retries never make progress run backwards.
    first_round_batches = max(1, -(-len(pending) // cfg.batch_size))
    batches_done = 0
    for round_index in range(1 + RETRY_ROUNDS):
        if not pending:
            break
        pending.sort(key=lambda i: requests[i].length)
        failed: list[int] = []
        for start in range(0, len(pending), cfg.batch_size):
            chunk = pending[start:start + cfg.batch_size]
            replies = generator.complete(
                [requests[i].messages for i in chunk],
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                # Distinct per batch and per round; fixed for a given (seed, passages, config).
                seed=seed * 1_000_003 + round_index * 100_003 + start,
            )
            for i, reply in zip(chunk, replies, strict=True):
                text = clean_query(reply, requests[i].query_type, requests[i].passage)
                if text is None:
                    failed.append(i)
                else:
                    answers[i] = text
            batches_done += 1
            progress(
                min(1.0, batches_done / first_round_batches),
                f"generated {len(answers)} of {len(requests)} queries",
            )
        pending = failed
    return [
        Query(
            id=query_id(request.query_type, request.passage.id),
            text=answers[i],
            query_type=request.query_type.value,
            source_id=request.passage.id,
        )
        for i, request in enumerate(requests)
        if i in answers
    ]
