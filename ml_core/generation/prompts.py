"""Prompts for the six synthetic query types, as chat conversations.

The task wording follows the recipe of Tamber et al. 2025 ("Teaching Dense Retrieval Models to
Specialize with Listwise Distillation and LLM Data Augmentation", arXiv 2502.19712, section 3):
text under 20 words, answerable by / about the passage, standing alone, not copying long phrases,
plain text only. The few-shot examples are our own writing, spread over unrelated domains so the
generator copies the *form* of a query type rather than a topic.

Small instruction models (e.g. SmolLM2-135M) follow a bare instruction poorly but continue a
pattern well, so the examples are encoded as earlier user/assistant turns of the conversation:
the model sees "Passage: ..." answered by a query several times, then a new passage.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ml_core.config import QueryType

# Long passages make prompts slow on CPU and add little: the gist of a passage is at its start.
MAX_PASSAGE_CHARS = 1000

_RULES = (
    "It must be under 20 words, make sense on its own without the passage, and not copy long "
    "phrases from the passage. Respond only with the plain text"
)

INSTRUCTIONS: dict[QueryType, str] = {
    QueryType.QUESTIONS: (
        "You write search questions. Given a passage, write one question that the passage "
        f"answers. {_RULES} of the question."
    ),
    QueryType.CLAIMS: (
        "You write claims. Given a passage, write one factual claim that the passage supports. "
        f"{_RULES} of the claim."
    ),
    QueryType.TITLES: (
        "You write titles. Given a passage, write a short title saying what the passage is about. "
        f"{_RULES} of the title."
    ),
    QueryType.KEYWORDS: (
        "You write search keywords. Given a passage, write up to 5 key phrases, separated by "
        "commas, that someone would search to find the passage. "
        f"{_RULES} of the key phrases."
    ),
    QueryType.ZERO_SHOT_USER: (
        "You imitate people using a search engine. Given a passage, write the casual, "
        "conversational search query a real person would type to find the information in the "
        f"passage. {_RULES} of the query."
    ),
    QueryType.FEW_SHOT_USER: (
        "You imitate web search users. Given a passage, write a short search query, like the ones "
        f"people type into a web search box, that the passage answers. {_RULES} of the query."
    ),
    QueryType.LIKE_EXAMPLES: (
        "You imitate the users of one search collection. Given a passage, write one query that "
        "the passage answers, worded the way these users word their queries. "
        f"{_RULES} of the query."
    ),
}

# The recipe's zero-shot user type is defined by having no examples.
ZERO_SHOT_TYPES: frozenset[QueryType] = frozenset({QueryType.ZERO_SHOT_USER})

# Without examples to continue, small models lose the task behind a long passage (SmolLM2-135M
# answered "The passage is ..." or "I'm ready to assist"); restating it after the passage helps.
TASK_REMINDERS: dict[QueryType, str] = {
    QueryType.QUESTIONS: "Write one question that this passage answers.",
    QueryType.CLAIMS: "Write one claim that this passage supports.",
    QueryType.TITLES: "Write a title for this passage.",
    QueryType.KEYWORDS: "Write up to 5 comma-separated key phrases for this passage.",
    QueryType.ZERO_SHOT_USER: (
        "Write the casual search query a person would type to find this passage."
    ),
    QueryType.FEW_SHOT_USER: "Write a short web search query that this passage answers.",
    QueryType.LIKE_EXAMPLES: "Write one query that this passage answers, as these users would.",
}


@dataclass(frozen=True, slots=True)
class Example:
    """One few-shot demonstration: a passage and the query of each type written for it."""

    passage: str
    queries: dict[QueryType, str]


_Q, _C, _T, _K, _U = (QueryType.QUESTIONS, QueryType.CLAIMS, QueryType.TITLES, QueryType.KEYWORDS,
                      QueryType.FEW_SHOT_USER)

# Our own passages and queries (no dataset text), eight domains.
EXAMPLES: tuple[Example, ...] = (
    Example(
        "Iron deficiency anaemia develops slowly as the body's iron stores run down. Early signs "
        "are tiredness and pale skin. A ferritin blood test confirms it, and iron tablets taken "
        "for about three months refill the stores.",
        {
            _Q: "How long do iron tablets need to be taken to treat anaemia?",
            _C: "Oral iron tablets are the usual treatment for iron deficiency anaemia.",
            _T: "Recognising and Treating Iron Deficiency Anaemia",
            _K: "iron deficiency anaemia, ferritin test, iron tablets, tiredness",
            _U: "how long to take iron tablets for anemia",
        },
    ),
    Example(
        "Sweeping a wing back reduces the airflow component perpendicular to its leading edge, "
        "so shock waves form at a higher flight Mach number and the transonic drag rise is "
        "delayed. The cost is poorer lift at low speed.",
        {
            _Q: "Why do swept wings let aircraft fly closer to the speed of sound?",
            _C: "Sweeping a wing back raises the Mach number at which shock waves form.",
            _T: "Wing Sweep and the Transonic Drag Rise",
            _K: "swept wing, transonic drag rise, critical Mach number, shock waves",
            _U: "why are airliner wings swept back",
        },
    ),
    Example(
        "A landlord must usually return a tenant's security deposit within 14 to 30 days after "
        "the lease ends. Deductions are allowed for unpaid rent and damage beyond normal wear and "
        "tear, and must be itemised.",
        {
            _Q: "What can a landlord deduct from a tenant's security deposit?",
            _C: "Landlords must itemise any deductions they make from a security deposit.",
            _T: "Rules for Returning a Tenant's Security Deposit",
            _K: "security deposit, landlord deductions, wear and tear, end of lease",
            _U: "how many days does landlord have to return deposit",
        },
    ),
    Example(
        "A database index keeps a sorted copy of selected columns, so lookups can use a tree "
        "search instead of scanning the whole table. Every insert and update must also update "
        "the index, which slows down write-heavy tables.",
        {
            _Q: "Why can adding an index slow down a table with many writes?",
            _C: "Database indexes make reads faster but add work to every insert and update.",
            _T: "The Read and Write Trade-off of Database Indexes",
            _K: "database index, query speed, full table scan, write overhead",
            _U: "does adding an index slow down inserts",
        },
    ),
    Example(
        "Resting a steak for five to ten minutes after cooking lets its juices spread back "
        "through the meat instead of spilling onto the board. Its internal temperature also "
        "keeps rising by a few degrees while it rests.",
        {
            _Q: "Why should a steak rest before it is cut?",
            _C: "A steak keeps getting hotter inside for a few minutes after leaving the pan.",
            _T: "Why Resting Meat Keeps It Juicy",
            _K: "resting steak, meat juices, carryover cooking, internal temperature",
            _U: "how long to let steak rest",
        },
    ),
    Example(
        "An index fund holds every share in a market index instead of picking stocks. With no "
        "analysts to pay, its annual fees are often below 0.2 percent, and over long periods "
        "most actively managed funds fail to beat their index after fees.",
        {
            _Q: "Why are index funds cheaper than actively managed funds?",
            _C: "Most actively managed funds do worse than their index after fees.",
            _T: "Index Funds and the Cost of Active Management",
            _K: "index fund, management fees, active funds, long-term returns",
            _U: "index fund vs managed fund fees",
        },
    ),
    Example(
        "Gutenberg's printing press of about 1450 combined movable metal type, oil-based ink "
        "and a screw press. Books that took scribes months could be made in days, and within "
        "fifty years presses worked in over two hundred European towns.",
        {
            _Q: "What did Gutenberg combine to build his printing press?",
            _C: "Printing spread to hundreds of European towns within fifty years of Gutenberg.",
            _T: "How Gutenberg's Press Changed Book Production",
            _K: "Gutenberg, printing press, movable type, 15th century Europe",
            _U: "when did gutenberg invent the printing press",
        },
    ),
    Example(
        "Coral bleaching happens when water that is too warm makes corals expel the algae in "
        "their tissue, which supply their food and colour. If the water cools within a few "
        "weeks the algae can return; long heatwaves kill the reef.",
        {
            _Q: "What makes corals turn white during a marine heatwave?",
            _C: "Bleached corals can recover if the water cools within a few weeks.",
            _T: "Ocean Heat and the Bleaching of Coral Reefs",
            _K: "coral bleaching, ocean warming, coral algae, marine heatwave",
            _U: "can bleached coral recover",
        },
    ),
)


def _example_query(example: Example, query_type: QueryType) -> str:
    # Zero-shot users have no examples of their own; they never reach here (see ZERO_SHOT_TYPES).
    return example.queries[query_type]


def passage_snippet(text: str, title: str = "", max_chars: int = MAX_PASSAGE_CHARS) -> str:
    """The passage as shown to the generator: title + text, cut at a word boundary."""
    title = title.strip()
    # Many corpora repeat the title as the text's first sentence; don't show it twice.
    repeated = text.strip().lower().startswith(title.lower())
    body = f"{title}. {text}" if title and not repeated else text
    body = " ".join(body.split())
    if len(body) <= max_chars:
        return body
    cut = body[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


def customer_examples(pairs: Sequence[tuple[str, str]]) -> tuple[Example, ...]:
    """The like_examples type's few-shot pool: each customer query with the passage text shown
    beside it (its snippet, as the generator sees any passage)."""
    return tuple(Example(passage_snippet(passage), {QueryType.LIKE_EXAMPLES: query})
                 for query, passage in pairs)


def build_messages(
    passage_text: str,
    query_type: QueryType | str,
    n_examples: int,
    rng: random.Random,
    title: str = "",
    pool: Sequence[Example] | None = None,
) -> list[dict[str, str]]:
    """A chat conversation asking for one query of `query_type` about the passage.

    Returns [system instruction, (user passage, assistant query) x n_examples, user passage].
    The examples are drawn with `rng` from `pool`, EXAMPLES when None (none for the zero-shot
    type); the like_examples type needs the customer's pool (customer_examples). Without
    examples, the last turn restates the task after the passage (TASK_REMINDERS).
    """
    query_type = QueryType(query_type)
    if query_type == QueryType.LIKE_EXAMPLES and not pool:
        raise ValueError("the like_examples query type needs the customer's example queries")
    examples = tuple(pool) if pool is not None else EXAMPLES
    messages = [{"role": "system", "content": INSTRUCTIONS[query_type]}]
    n_examples = 0 if query_type in ZERO_SHOT_TYPES else min(n_examples, len(examples))
    for example in rng.sample(examples, n_examples):
        messages.append({"role": "user", "content": f"Passage: {example.passage}"})
        messages.append({"role": "assistant", "content": _example_query(example, query_type)})
    last = f"Passage: {passage_snippet(passage_text, title)}"
    if n_examples == 0:
        last += f"\n\n{TASK_REMINDERS[query_type]}"
    messages.append({"role": "user", "content": last})
    return messages
