"""Synthetic query generation: one query per passage per query type, cleaned and deduplicated.

Re-implements step 3 of the recipe of Tamber et al. 2025 (arXiv 2502.19712): an instruction LLM
writes a query of each type for every sampled passage; replies are reduced to a single plausible
query line. Whatever still slips through is the teacher's round-trip filter's job.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ml_core.config import EXTRACTIVE_QUERY_TYPES, GenerationConfig, QueryType
from ml_core.generation.backends import Conversation, Generator
from ml_core.generation.prompts import (
    EXAMPLES,
    MAX_PASSAGE_CHARS,
    Example,
    build_messages,
    customer_examples,
)
from ml_core.records import Passage, ProgressFn, Query, no_progress

# A query longer than this is cut to it (the prompt asks for under 20 words; a few more are
# tolerated rather than thrown away).
MAX_QUERY_WORDS = 24
MAX_KEY_PHRASES = 5
# One word is a key phrase, but not a question, claim, title or search query.
MIN_QUERY_WORDS = 2
# A run of this many words copied verbatim from the passage is an extract, not a query (the
# prompt forbids copying long phrases).
MIN_COPIED_WORDS = 10
# A repeated word n-gram of this size marks a generation loop ("the impact and free-stream of
# the impact and free-stream of ...").
LOOP_NGRAM = 4
# An extractive query is a sentence of at least this many words, or a span of this many up to
# MAX_EXTRACT_WORDS words of a longer one (the length of a generated query).
MIN_EXTRACT_WORDS = 5
MAX_EXTRACT_WORDS = 20
# Replies that were unusable are asked for again once with another seed: cheap, and it keeps
# the per-type counts even when a small model misfires.
RETRY_ROUNDS = 1

_LABEL = re.compile(
    r"^\s*(?:here(?:'s| is| are)[^:]*:|sure[,!.]?[^:]*:|a\s*:|"
    r"an?\s+(?:person|user|searcher)\s+(?:would|might|could)\s+(?:type|search|ask)[^:]*:|"
    r"(?:search\s+|user\s+|short\s+|web\s+)?(?:query|question|claim|title|keywords?|"
    r"key\s*phrases?|answer|response|output)\s*\d*\s*[:\-–—]\s*)",
    re.IGNORECASE,
)
# Replies about the prompt rather than the passage's content ("The passage is ...", "I'm ready to
# assist"), which break the rule that a query must make sense without the passage.
_META = re.compile(
    r"^passage\s*:|\b(?:th(?:e|is|at) (?:passage|text|paragraph|excerpt|article)|"
    r"i'?m ready|as an ai|i can(?:not|'t) help|i'?m sorry)\b",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•>#]+|\d+[.)])\s+")
_QUOTES = "\"'“”‘’`*_"
# A sentence ends at . ! or ? before a space, but not after an initial ("h. l. dryden", "e.g.").
_SENTENCE_END = re.compile(r"(?<![\s.][^\W\d_]\.)(?<=[.!?])\s")


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _normalised(text: str) -> str:
    return " ".join(_words(text))


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


# What small generators leak from their few-shot examples instead of reading the passage: whole
# example queries, example key phrases, and 4-word runs of example text.
_EXAMPLE_QUERIES = frozenset(_normalised(q) for e in EXAMPLES for q in e.queries.values())
_EXAMPLE_PHRASES = frozenset(
    _normalised(phrase)
    for e in EXAMPLES
    for phrase in e.queries[QueryType.KEYWORDS].split(",")
)
_EXAMPLE_NGRAMS = frozenset(
    gram
    for e in EXAMPLES
    for text in (e.passage, *e.queries.values())
    for gram in _ngrams(_words(text), 4)
)


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def _loops(words: list[str]) -> bool:
    grams = _ngrams(words, LOOP_NGRAM)
    repeated_word = any(a == b == c for a, b, c in zip(words, words[1:], words[2:], strict=False))
    return repeated_word or len(set(grams)) < len(grams)


def _leaks_examples(text: str, passage_words: list[str], query_type: QueryType) -> bool:
    words = _words(text)
    in_passage = set(_ngrams(passage_words, 4))
    if any(g in _EXAMPLE_NGRAMS and g not in in_passage for g in _ngrams(words, 4)):
        return True
    if query_type == QueryType.KEYWORDS:
        passage_text = " ".join(passage_words)
        return any(
            (key := _normalised(p)) in _EXAMPLE_PHRASES and key not in passage_text
            for p in text.split(",")
        )
    return False


def _key_phrases(text: str) -> str:
    phrases = [p.strip().strip(_QUOTES).strip() for p in re.split(r"[,;]", text)]
    # Small models loop ("aerofoil, aerofoil, aerofoil"): keep each phrase once.
    seen: set[str] = set()
    unique = []
    for phrase in phrases:
        key = _normalised(phrase)
        if key and key not in seen:
            seen.add(key)
            unique.append(" ".join(phrase.split()[: MAX_QUERY_WORDS // 2]))
    return ", ".join(unique[:MAX_KEY_PHRASES])


def clean_query(raw: str, query_type: QueryType | str, passage: Passage) -> str | None:
    """The usable query in a raw LLM reply, or None when there is none.

    Keeps the first non-empty line (and of it the first sentence); strips labels ("Query:",
    "Here is a title:"), bullets and quotes; keeps 5 distinct key phrases for keywords and
    MAX_QUERY_WORDS words otherwise. None for: empty replies or replies with no letters;
    replies about "the passage" (they don't stand alone); generation loops; copies of the
    passage's first sentence or of MIN_COPIED_WORDS+ word runs of it (a title may repeat the
    document's title); and replies that repeat a few-shot example instead of the passage.
    """
    query_type = QueryType(query_type)
    text = ""
    # A reply may open with a label line ("Query:") whose content is on the next line.
    for line in raw.replace("\r", "\n").split("\n"):
        line = _BULLET.sub("", line.strip()).strip(_QUOTES)
        line = _LABEL.sub("", line, count=1).strip().strip(_QUOTES)
        if line.strip():
            text = line.strip()
            break
    if not re.search(r"[^\W\d_]", text) or _META.search(text):
        return None
    if query_type == QueryType.KEYWORDS:
        text = _key_phrases(text)
    else:
        first = _first_sentence(text)
        # Rambling replies run on past one sentence; the first one is the query.
        if len(first.split()) >= 3:
            text = first
    words = text.split()
    if len(words) > MAX_QUERY_WORDS:
        text = " ".join(words[:MAX_QUERY_WORDS])
    text = text.rstrip(" ,;:-").strip(_QUOTES)
    query_words = _words(text)
    if len(query_words) < (1 if query_type == QueryType.KEYWORDS else MIN_QUERY_WORDS):
        return None
    loop_units = text.split(",") if query_type == QueryType.KEYWORDS else [text]
    if any(_loops(_words(unit)) for unit in loop_units):
        return None
    passage_words = _words(passage.text)
    norm = " ".join(query_words)
    is_title = query_type == QueryType.TITLES and norm in _normalised(passage.title)
    if not is_title:
        if norm in {" ".join(passage_words), _normalised(_first_sentence(passage.text)),
                    _normalised(passage.title)}:
            return None
        copied = set(_ngrams(passage_words, MIN_COPIED_WORDS))
        if any(g in copied for g in _ngrams(query_words, MIN_COPIED_WORDS)):
            return None
    if norm in _EXAMPLE_QUERIES or _leaks_examples(text, passage_words, query_type):
        return None
    return text


@dataclass(frozen=True, slots=True)
class _Request:
    passage: Passage
    query_type: QueryType

    @property
    def length(self) -> int:
        return len(self.passage.title) + min(len(self.passage.text), MAX_PASSAGE_CHARS)


def query_id(query_type: QueryType | str, passage_id: str) -> str:
    """The deterministic id of the query of `query_type` generated from a passage."""
    return f"{QueryType(query_type).value}:{passage_id}"


def _batches(requests: list[_Request], pending: list[int], size: int) -> list[list[int]]:
    # One query type per batch, passages sorted by length: the rows of a batch then share their
    # system prompt and few-shot examples (a prefix the transformers backend prefills once, and
    # vLLM caches), and differ only in a passage of similar length (little padding).
    by_type: dict[QueryType, list[int]] = {}
    for i in sorted(pending):
        by_type.setdefault(requests[i].query_type, []).append(i)
    batches = []
    for indices in by_type.values():
        indices.sort(key=lambda i: (requests[i].length, i))
        batches.extend(indices[start:start + size] for start in range(0, len(indices), size))
    return batches


def build_batch(
    requests: list[_Request], cfg: GenerationConfig, examples_seed: str,
    customer_pool: Sequence[Example] = (),
) -> list[Conversation]:
    """The conversations of one batch: every row gets the same few-shot examples, drawn with
    `examples_seed` (so each batch still sees a random 3 of the example pool); the
    like_examples type draws from `customer_pool`."""
    conversations = []
    for request in requests:
        # The title would hand the answer to the titles type; other types get it as context.
        title = "" if request.query_type == QueryType.TITLES else request.passage.title
        rng = random.Random(examples_seed)  # str seeds hash deterministically
        pool = customer_pool if request.query_type == QueryType.LIKE_EXAMPLES else None
        conversations.append(build_messages(
            request.passage.text, request.query_type, cfg.few_shot_examples, rng, title, pool
        ))
    return conversations


def source_title_query(title: str) -> str | None:
    """A corpus title as a query: whitespace collapsed, a trailing lone period dropped (Cranfield
    writes "... plate ."), cut to MAX_QUERY_WORDS; None when under MIN_QUERY_WORDS words."""
    words = title.split()
    if words and words[-1] == ".":
        words = words[:-1]
    if len(_words(" ".join(words))) < MIN_QUERY_WORDS:
        return None
    return " ".join(words[:MAX_QUERY_WORDS])


def extractive_query(passage: Passage, seed: int) -> str | None:
    """A pseudo-query cut from the passage, as the inverse cloze task does (Lee et al. 2019,
    arXiv 1906.00300; GPL-style pipelines use it where generation is too costly): one of its
    sentences of MIN_EXTRACT_WORDS+ words drawn with a seed of (seed, passage id), whitespace
    collapsed and a trailing period dropped; of a sentence over MAX_EXTRACT_WORDS words, a
    seeded span of MIN_EXTRACT_WORDS to MAX_EXTRACT_WORDS words. None when no sentence is long
    enough. The passage is not changed: the query is a copy of part of it."""
    rng = random.Random(f"{seed}:extractive:{passage.id}")  # str seeds hash deterministically
    sentences = [s.split() for s in _SENTENCE_END.split(passage.text.strip())]
    for words in sentences:
        if words and words[-1] in {".", "!", "?"}:  # Cranfield writes "... plate ."
            words.pop()
    candidates = [words for words in sentences if len(_words(" ".join(words))) >= MIN_EXTRACT_WORDS]
    if not candidates:
        return None
    words = rng.choice(candidates)
    if len(words) > MAX_EXTRACT_WORDS:
        length = rng.randint(MIN_EXTRACT_WORDS, MAX_EXTRACT_WORDS)
        start = rng.randint(0, len(words) - length)
        words = words[start:start + length]
    text = " ".join(words).rstrip(" ,;:")
    if text.endswith(".") and not re.search(r"(?:^|\s)[^\W\d_]\.$", text):
        text = text[:-1]  # a sentence's full stop, not an initial's ("h. l. dryden.")
    return text if len(_words(text)) >= MIN_QUERY_WORDS else None


def _extracted(requests: list[_Request], seed: int) -> dict[int, str]:
    """Answers of the extractive requests: a sentence or span of each passage (`extractive`),
    and one source-title query per document (the first sampled chunk of it), none for a
    passage without a usable title."""
    answers: dict[int, str] = {}
    seen: set[str] = set()
    for i, request in enumerate(requests):
        if request.query_type not in EXTRACTIVE_QUERY_TYPES:
            continue
        if request.query_type == QueryType.EXTRACTIVE:
            if (text := extractive_query(request.passage, seed)) is not None:
                answers[i] = text
            continue
        if request.query_type != QueryType.SOURCE_TITLES:
            # generate_queries sends no extractive type to the generator: one without an
            # extractor here would silently yield no queries.
            raise NotImplementedError(f"no extractor for query type {request.query_type.value!r}")
        document = request.passage.document_id
        text = source_title_query(request.passage.title)
        if text is not None and document not in seen:
            seen.add(document)
            answers[i] = text
    return answers


def generate_queries(
    passages: list[Passage],
    cfg: GenerationConfig,
    generator: Generator | None,
    seed: int,
    progress: ProgressFn = no_progress,
    extractive_only: list[Passage] | None = None,
    examples: Sequence[tuple[str, str]] = (),
) -> list[Query]:
    """Synthetic queries: one per passage per type in `cfg.query_types`, minus unusable replies.

    Extractive types need no generator call: `source_titles` queries are the passages' own
    titles (one per document), `extractive` ones a seeded sentence or span of the passage
    (extractive_query). They also cover `extractive_only`, passages the generated types skip
    (generation.cheap_passages), whose queries come last. The generated types' queries are the
    same with or without any of them. `generator` may be None only when every type in
    `cfg.query_types` is extractive. `examples` are the like_examples type's (customer query,
    passage text) pairs; a reply that repeats one of those queries is unusable.

    Requests are batched by query type (`cfg.batch_size` rows sharing one random draw of
    few-shot examples, passages sorted by length); replies that clean to nothing are retried
    once with other examples and another seed. Query ids are `<type>:<passage id>`; results come
    in passage order, then type order. `progress` is called after every batch. The output is a
    function of (passages, cfg, seed) and the generator.
    """
    requests = [_Request(p, t) for p in passages for t in cfg.query_types]
    customer_pool = customer_examples(examples)
    customer_queries = frozenset(_normalised(query) for query, _ in examples)
    # Appended, so the generated types' requests keep their order (and so their batches).
    requests += [_Request(p, t) for p in extractive_only or [] for t in cfg.query_types
                 if t in EXTRACTIVE_QUERY_TYPES]
    # Extractive types are read off the passage; only the rest go to the generator, batched and
    # seeded exactly as they would be without them.
    answers: dict[int, str] = _extracted(requests, seed)
    pending = [i for i, r in enumerate(requests) if r.query_type not in EXTRACTIVE_QUERY_TYPES]
    if pending and generator is None:
        needing = sorted({requests[i].query_type.value for i in pending})
        raise ValueError(f"query types {needing} need a generator, and none was given")
    # Total batches over all rounds is unknown up front; report against the first round and
    # cap at 1.0 so retries never make progress run backwards.
    first_round_batches = max(1, len(_batches(requests, pending, cfg.batch_size)))
    batches_done = 0
    for round_index in range(1 + RETRY_ROUNDS):
        failed: list[int] = []
        for batch_index, batch in enumerate(_batches(requests, pending, cfg.batch_size)):
            query_type = requests[batch[0]].query_type.value
            examples_seed = f"{seed}:{round_index}:{query_type}:{batch_index}"
            conversations = build_batch([requests[i] for i in batch], cfg, examples_seed,
                                        customer_pool)
            replies = generator.complete(
                conversations,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                # Distinct per batch and per round; fixed for a given (seed, passages, config).
                seed=seed * 1_000_003 + round_index * 100_003 + batches_done,
            )
            for i, reply in zip(batch, replies, strict=True):
                text = clean_query(reply, requests[i].query_type, requests[i].passage)
                if text is None or _normalised(text) in customer_queries:
                    failed.append(i)
                else:
                    answers[i] = text
            batches_done += 1
            progress(
                min(1.0, batches_done / first_round_batches),
                f"generated {len(answers)} of {len(requests)} queries",
            )
        pending = failed
        if not pending:
            break
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
