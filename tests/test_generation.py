"""Prompts, output cleaning, generate_queries, and the three generator backends."""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Iterator

import pytest

from ml_core.config import EXTRACTIVE_QUERY_TYPES, LLM_QUERY_TYPES, GenerationConfig, QueryType
from ml_core.generation import (
    EXAMPLES,
    GeneratorError,
    OpenAIGenerator,
    TransformersGenerator,
    VLLMGenerator,
    build_messages,
    clean_query,
    generate_queries,
    load_generator,
)
from ml_core.generation.prompts import customer_examples
from ml_core.records import Passage
from tests.http_servers import JsonHandler, serving

PASSAGE = Passage(
    "p1",
    "Laminar flow over a flat plate becomes turbulent at high Reynolds numbers. The transition "
    "raises skin friction drag.",
    title="Boundary layer transition",
)


# ---------------------------------------------------------------------------------------------
# Prompts


CUSTOMER_POOL = customer_examples([
    ("drag of a blunt cone at mach 6 .", "Blunt cones at Mach 6 were tested for drag."),
    ("what is known about panel flutter .", "Panel flutter of thin plates in supersonic flow."),
    ("heat transfer to a yawed cylinder .", "Heat transfer on a yawed cylinder was measured."),
    ("buckling of thin shells under pressure", "Thin cylindrical shells buckle under pressure."),
])


@pytest.mark.parametrize("query_type", LLM_QUERY_TYPES)
def test_prompt_states_the_recipe_rules_and_ends_with_the_passage(query_type: QueryType) -> None:
    pool = CUSTOMER_POOL if query_type == QueryType.LIKE_EXAMPLES else None
    messages = build_messages(PASSAGE.text, query_type, 3, random.Random(0), pool=pool)
    system = messages[0]["content"]
    assert messages[0]["role"] == "system"
    assert "under 20 words" in system and "Respond only with the plain text" in system
    assert "on its own" in system and "not copy long phrases" in system
    assert messages[-1]["role"] == "user"
    assert messages[-1]["content"].startswith(f"Passage: {PASSAGE.text}")
    roles = [m["role"] for m in messages[1:]]
    if query_type == QueryType.ZERO_SHOT_USER:
        assert roles == ["user"]  # zero-shot: no examples, whatever the config says
        assert messages[-1]["content"].endswith("to find this passage.")  # task restated
    else:
        assert roles == ["user", "assistant"] * 3 + ["user"]
        assert messages[-1]["content"] == f"Passage: {PASSAGE.text}"  # the pattern continues


def test_few_shot_examples_are_seeded_and_vary_between_prompts() -> None:
    def examples(seed: int) -> list[str]:
        messages = build_messages("text", QueryType.QUESTIONS, 3, random.Random(seed))
        return [m["content"] for m in messages if m["role"] == "assistant"]

    assert examples(1) == examples(1)
    assert len({tuple(examples(seed)) for seed in range(10)}) > 1
    pool = {e.queries[QueryType.QUESTIONS] for e in EXAMPLES}
    assert set(examples(1)) <= pool


def test_like_examples_prompts_show_the_customer_queries_beside_their_passages() -> None:
    messages = build_messages(PASSAGE.text, QueryType.LIKE_EXAMPLES, 3, random.Random(4),
                              pool=CUSTOMER_POOL)
    shown = list(zip(messages[1:-1:2], messages[2:-1:2], strict=True))
    assert len(shown) == 3
    by_query = {e.queries[QueryType.LIKE_EXAMPLES]: e.passage for e in CUSTOMER_POOL}
    for user, assistant in shown:
        assert user["content"] == f"Passage: {by_query[assistant['content']]}"
    assert "worded the way these users word their queries" in messages[0]["content"]
    # Our own examples never stand in for the customer's, and no pool is refused by name.
    generic = {q for e in EXAMPLES for q in e.queries.values()}
    assert not {a["content"] for _, a in shown} & generic
    with pytest.raises(ValueError, match="like_examples query type needs the customer's"):
        build_messages(PASSAGE.text, QueryType.LIKE_EXAMPLES, 3, random.Random(4))
    # The other types keep drawing from our examples even when a customer pool is at hand.
    plain = build_messages(PASSAGE.text, QueryType.QUESTIONS, 3, random.Random(4))
    assert build_messages(PASSAGE.text, QueryType.QUESTIONS, 3, random.Random(4),
                          pool=None) == plain


def test_example_queries_and_the_like_examples_type_ask_for_each_other() -> None:
    config = GenerationConfig(query_types=["like_examples", "questions"],
                              example_queries=["  drag of a blunt cone  ", "panel flutter"])
    assert config.example_queries == ["drag of a blunt cone", "panel flutter"]
    with pytest.raises(ValueError, match="give some in generation.example_queries"):
        GenerationConfig(query_types=["like_examples"])
    with pytest.raises(ValueError, match="add like_examples to generation.query_types"):
        GenerationConfig(example_queries=["panel flutter"])
    with pytest.raises(ValueError, match="at least 1 character"):
        GenerationConfig(query_types=["like_examples"], example_queries=["   "])


def test_every_example_has_a_query_of_every_few_shot_type() -> None:
    # like_examples draws on the customer's examples, never on ours.
    few_shot_types = set(LLM_QUERY_TYPES) - {QueryType.ZERO_SHOT_USER, QueryType.LIKE_EXAMPLES}
    assert len(EXAMPLES) >= 8
    for example in EXAMPLES:
        assert set(example.queries) == few_shot_types
        for text in example.queries.values():
            assert len(text.split()) < 20


def test_long_passages_are_cut_at_a_word_boundary() -> None:
    messages = build_messages("word " * 1000, QueryType.TITLES, 0, random.Random(0))
    shown = messages[-1]["content"].split("\n")[0]
    assert len(shown) < 1100 and shown.endswith("word ...")


# ---------------------------------------------------------------------------------------------
# Cleaning


@pytest.mark.parametrize(
    ("raw", "query_type", "expected"),
    [
        ('Query: "what causes turbulent transition?"\nPassage: more text', "questions",
         "what causes turbulent transition?"),
        ("Here is a title:\n\n**Why Plates Get Turbulent**", "titles", "Why Plates Get Turbulent"),
        ("1. laminar flow, turbulence, drag, plates, Reynolds number, skin friction", "keywords",
         "laminar flow, turbulence, drag, plates, Reynolds number"),
        ("Search query: flat plate drag turbulence", "few_shot_user", "flat plate drag turbulence"),
        ('"A person would type: "plate drag"', "zero_shot_user", "plate drag"),
        ("drag, Drag, wind tunnel, drag.", "keywords", "drag, wind tunnel"),
        # Short spans of the passage are fine; only long verbatim extracts are dropped.
        ("Why does laminar flow over a flat plate become turbulent?", "questions",
         "Why does laminar flow over a flat plate become turbulent?"),
        (" ".join(f"w{i}x" for i in range(40)), "claims", " ".join(f"w{i}x" for i in range(24))),
        ("Drag grows after transition. It is large. More text follows", "claims",
         "Drag grows after transition."),
        ("Why did h. l. dryden study drag? Because", "questions",
         "Why did h. l. dryden study drag?"),
        ("drag", "keywords", "drag"),
    ],
)
def test_clean_query_keeps_one_plain_query(raw: str, query_type: str, expected: str) -> None:
    assert clean_query(raw, query_type, PASSAGE) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   \n  ",
        "123 456",
        "Query:",
        "Laminar flow over a flat plate becomes turbulent at high Reynolds numbers.",
        "boundary layer transition",
        "What can a landlord deduct from a tenant's security deposit?",  # a few-shot answer
        "What is the main idea of the passage?",
        'Passage: "Drag rises after the flow turns turbulent.',  # the model echoing the prompt
        "I'm ready to assist you with your request.",
        "Laminar flow over a flat plate becomes turbulent at high",  # 10 copied words
        "The Impact of Drag and Flow on the Impact of Drag and Flow",  # a generation loop
        "drag drag drag",
        "Aerodynamics",  # one word is not a question
        "how did gutenberg invent the printing press",  # an example's topic, not the passage's
    ],
)
def test_clean_query_drops_empty_and_copied_replies(raw: str) -> None:
    assert clean_query(raw, "questions", PASSAGE) is None


def test_key_phrases_from_the_examples_count_only_when_the_passage_has_them() -> None:
    passage = Passage("p2", "Shock waves form on the wing at transonic speeds.")
    assert clean_query("shock waves, transonic wing", "keywords", passage) == (
        "shock waves, transonic wing"  # "shock waves" is an example phrase, but also in the text
    )
    assert clean_query("iron deficiency anaemia, transonic wing", "keywords", passage) is None


def test_clean_query_allows_a_title_that_matches_the_documents_title() -> None:
    title = "Boundary Layer Transition"
    assert clean_query(title, "titles", PASSAGE) == title


# ---------------------------------------------------------------------------------------------
# generate_queries with a scripted generator


class ScriptedGenerator:
    """Answers from the passage id and query type found in the prompt; records every call."""

    def __init__(self, fail_first: set[str] | None = None) -> None:
        self.calls: list[dict] = []
        self.fail_first = set(fail_first or ())

    def complete(self, conversations, temperature, max_new_tokens, seed):
        self.calls.append({"seed": seed, "temperature": temperature,
                           "max_new_tokens": max_new_tokens, "conversations": conversations})
        replies = []
        for conversation in conversations:
            passage = conversation[-1]["content"].removeprefix("Passage: ")
            kind = conversation[0]["content"].split(".")[0]
            key = passage.split()[0]
            if key in self.fail_first:
                self.fail_first.discard(key)
                replies.append("   ")
            else:
                replies.append(f'Query: "{key} {kind[:20]}"')
        return replies


def _passages(n: int) -> list[Passage]:
    # Later passages are longer.
    return [Passage(f"id{i}", f"doc{i} " + "filler " * (i * 3) + "end.") for i in range(n)]


def test_generate_queries_one_per_passage_per_type_with_stable_ids() -> None:
    cfg = GenerationConfig(query_types=["questions", "keywords"], batch_size=3)
    generator = ScriptedGenerator()
    reports: list[float] = []
    passages = list(reversed(_passages(4)))

    queries = generate_queries(passages, cfg, generator, seed=7,
                               progress=lambda f, m: reports.append(f))

    assert [q.id for q in queries] == [
        f"{t}:id{i}" for i in (3, 2, 1, 0) for t in ("questions", "keywords")
    ]
    assert {q.source_id for q in queries} == {f"id{i}" for i in range(4)}
    assert queries[0].query_type == "questions" and queries[0].text.startswith("doc3 ")
    assert not any(q.text.startswith(("Query", '"')) for q in queries)
    # Batches of at most 3 rows of one type, shortest passages first, one report per batch.
    assert [len(c["conversations"]) for c in generator.calls] == [3, 1, 3, 1]
    first = generator.calls[0]["conversations"]
    assert [c[-1]["content"].split()[1] for c in first] == ["doc0", "doc1", "doc2"]
    assert reports == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for call in generator.calls:
        # Rows of a batch share system prompt and examples: only the passage turn differs.
        assert len({str(c[:-1]) for c in call["conversations"]}) == 1
        assert call["temperature"] == cfg.temperature
        assert call["max_new_tokens"] == cfg.max_new_tokens
    assert len({str(call["conversations"][0][1:-1]) for call in generator.calls}) > 1


class CopyingGenerator:
    """Copies the last few-shot example's query on the first call (as small models do), then
    writes from the passage; records every call."""

    def __init__(self) -> None:
        self.calls: list[list] = []

    def complete(self, conversations, temperature, max_new_tokens, seed):
        self.calls.append(conversations)
        if len(self.calls) == 1:
            return [c[-2]["content"] for c in conversations]
        return [f"{c[-1]['content'].split()[1]} nozzle flow ." for c in conversations]


def test_like_examples_replies_that_copy_a_customer_query_are_retried() -> None:
    pairs = [("drag of a blunt cone at mach 6 .", "Blunt cones at Mach 6 were tested."),
             ("what is known about panel flutter .", "Panel flutter of thin plates.")]
    cfg = GenerationConfig(query_types=["like_examples"], example_queries=[q for q, _ in pairs],
                           few_shot_examples=2)
    generator = CopyingGenerator()
    queries = generate_queries(_passages(2), cfg, generator, seed=5, examples=pairs)
    assert [(q.id, q.text) for q in queries] == [
        ("like_examples:id0", "doc0 nozzle flow ."), ("like_examples:id1", "doc1 nozzle flow .")]
    assert len(generator.calls) == 2  # both first replies were copies, asked for again
    shown = [m["content"] for m in generator.calls[0][0] if m["role"] == "assistant"]
    assert sorted(shown) == sorted(q for q, _ in pairs)


def test_generate_queries_retries_unusable_replies_once() -> None:
    cfg = GenerationConfig(query_types=["titles"], batch_size=8)
    generator = ScriptedGenerator(fail_first={"doc1"})
    queries = generate_queries(_passages(3), cfg, generator, seed=1)
    assert [q.id for q in queries] == ["titles:id0", "titles:id1", "titles:id2"]
    assert [len(c["conversations"]) for c in generator.calls] == [3, 1]
    assert generator.calls[0]["seed"] != generator.calls[1]["seed"]


def test_source_titles_are_the_corpus_titles_one_per_document_and_leave_the_rest_alone() -> None:
    titled = [
        Passage("a#0", "first chunk of a", title="Flow past a flat plate .", parent_id="a"),
        Passage("a#1", "second chunk of a", title="Flow past a flat plate .", parent_id="a"),
        Passage("b", "doc b end.", title=""),  # no title: no query
        Passage("c", "doc c end.", title="Shock"),  # one word: not a query
        Passage("d", "doc d end.", title="  Heat   transfer at high Mach numbers"),
    ]
    # Extractive types alone need no generator at all.
    only = generate_queries(titled, GenerationConfig(query_types=["source_titles"]), None, seed=3)
    assert [(q.id, q.text, q.query_type, q.source_id) for q in only] == [
        ("source_titles:a#0", "Flow past a flat plate", "source_titles", "a#0"),
        ("source_titles:d", "Heat transfer at high Mach numbers", "source_titles", "d"),
    ]
    # Mixed with generated types, the generator sees exactly the calls it would without them.
    with_titles, without = ScriptedGenerator(), ScriptedGenerator()
    mixed = generate_queries(titled, GenerationConfig(query_types=["questions", "source_titles"],
                                                      batch_size=2), with_titles, seed=3)
    plain = generate_queries(titled, GenerationConfig(query_types=["questions"], batch_size=2),
                             without, seed=3)
    assert with_titles.calls == without.calls and with_titles.calls
    assert [q for q in mixed if q.query_type == "questions"] == plain
    assert [q.id for q in mixed if q.query_type == "source_titles"] == [
        "source_titles:a#0", "source_titles:d"]


def test_every_extractive_type_has_an_extractor() -> None:
    """The generator is never asked for an extractive type, so each one needs its extractor."""
    titled = [Passage("a", "Text of a, one sentence of several words.",
                      title="Flow past a flat plate")]
    for query_type in EXTRACTIVE_QUERY_TYPES:
        queries = generate_queries(titled, GenerationConfig(query_types=[query_type]), None, 1)
        assert [q.query_type for q in queries] == [query_type.value]


def test_generated_types_without_a_generator_are_refused_by_name() -> None:
    cfg = GenerationConfig(query_types=["source_titles", "claims", "questions"])
    with pytest.raises(ValueError, match=r"\['claims', 'questions'\] need a generator"):
        generate_queries(_passages(2), cfg, None, seed=1)


def test_generate_queries_is_deterministic_for_a_seed() -> None:
    cfg = GenerationConfig(query_types=["questions"], batch_size=2)
    first, second = ScriptedGenerator(), ScriptedGenerator()
    generate_queries(_passages(3), cfg, first, seed=5)
    generate_queries(_passages(3), cfg, second, seed=5)
    assert first.calls == second.calls


# ---------------------------------------------------------------------------------------------
# TransformersGenerator on the tiny causal LM


@pytest.fixture(scope="module")
def tiny_generator(registry) -> TransformersGenerator:
    # fp32, so that batched and single greedy decoding are exactly equal (bf16 rounds matrix
    # products by their shape); bf16 has its own tests below.
    cfg = GenerationConfig(precision="fp32")
    generator = load_generator(cfg, registry.get("tiny-generator"), registry)
    assert isinstance(generator, TransformersGenerator)
    return generator


def test_transformers_generator_is_seeded_and_decodes_only_new_tokens(tiny_generator) -> None:
    conversations = [
        [{"role": "user", "content": "Passage: the wing"}],
        [{"role": "system", "content": "long system prompt " * 5},
         {"role": "user", "content": "Passage: the aircraft wing has a shock"}],
    ]
    first = tiny_generator.complete(conversations, temperature=0.8, max_new_tokens=6, seed=3)
    again = tiny_generator.complete(conversations, temperature=0.8, max_new_tokens=6, seed=3)
    other = tiny_generator.complete(conversations, temperature=0.8, max_new_tokens=6, seed=4)

    assert len(first) == 2 and first == again and first != other
    longest_token = max(len(t) for t in tiny_generator.tokenizer.get_vocab())
    for reply in first:
        # Only new tokens come back: no prompt text, no special tokens, at most 6 tokens' worth.
        assert "long system prompt" not in reply and "Passage:" not in reply
        assert "<|im_start|>" not in reply and "<|im_end|>" not in reply
        assert len(reply) <= 6 * longest_token


def test_transformers_generator_left_pads_so_batching_matches_single_greedy(tiny_generator) -> None:
    short = [{"role": "user", "content": "Passage: wing"}]
    long = [{"role": "user", "content": "Passage: " + "boundary layer flow " * 8}]
    batched = tiny_generator.complete([short, long], temperature=0.0, max_new_tokens=5, seed=0)
    alone = tiny_generator.complete([short], temperature=0.0, max_new_tokens=5, seed=0)
    assert batched[0] == alone[0]


def test_generator_precision_sets_the_weights_number_format(registry, monkeypatch) -> None:
    import torch

    import ml_core.student

    spec = registry.get("tiny-generator")
    loaded = {}
    for wanted, native, dtype in [("fp32", True, torch.float32), ("bf16", False, torch.bfloat16),
                                  ("auto", True, torch.bfloat16), ("auto", False, torch.float32)]:
        monkeypatch.setattr(ml_core.student, "cpu_has_native_bf16",
                            lambda _info=None, native=native: native)
        # The CPU rule is under test (on a GPU host, auto is bf16 on the GPU).
        generator = load_generator(GenerationConfig(precision=wanted), spec, registry,
                                   device="cpu")
        assert isinstance(generator, TransformersGenerator)
        assert {p.dtype for p in generator.model.parameters()} == {dtype}
        assert generator.precision == ("bf16" if dtype == torch.bfloat16 else "fp32")
        loaded[generator.precision] = generator
    with pytest.raises(ValueError, match="precision"):
        TransformersGenerator.load(spec, device="cpu", precision="fp16")
    # bf16 samples seeded and decodes only new tokens, like fp32.
    conversations = [[{"role": "user", "content": "Passage: the aircraft wing has a shock"}]] * 2
    bf16 = loaded["bf16"]
    first = bf16.complete(conversations, temperature=0.8, max_new_tokens=6, seed=3)
    assert first == bf16.complete(conversations, temperature=0.8, max_new_tokens=6, seed=3)
    assert all("Passage:" not in reply and "<|im_end|>" not in reply for reply in first)


def test_generate_queries_end_to_end_on_the_tiny_model(tiny_generator) -> None:
    cfg = GenerationConfig(query_types=["questions", "keywords"], few_shot_examples=1,
                           max_new_tokens=8, batch_size=4)
    queries = generate_queries(_passages(2), cfg, tiny_generator, seed=0)
    # A random model writes noise, but every kept query is one cleaned line with a known id.
    expected_ids = {f"{t}:id{i}" for t in ("questions", "keywords") for i in (0, 1)}
    assert {q.id for q in queries} <= expected_ids
    assert all(q.text and "\n" not in q.text and len(q.text.split()) <= 24 for q in queries)


# ---------------------------------------------------------------------------------------------
# OpenAIGenerator against a real HTTP server


class _ChatServer(JsonHandler):
    """A minimal OpenAI-compatible endpoint: echoes the last user message and the seed; the
    first request for a message containing "busy" gets a 429, "broken" always gets a 400."""

    seen_busy: set[str] = set()
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.read_json()
        last = body["messages"][-1]["content"]
        if "broken" in last:
            return self.send_json(400, {"error": {"message": "bad request: broken"}})
        if "busy" in last:
            with self.lock:
                first_time = last not in self.seen_busy
                self.seen_busy.add(last)
            if first_time:
                return self.send_json(429, {"error": {"message": "slow down"}},
                                      {"Retry-After": "0"})
        reply = f"echo {last} seed={body['seed']} max={body['max_tokens']}"
        self.send_json(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": reply}}]})


@pytest.fixture()
def chat_server() -> Iterator[str]:
    _ChatServer.seen_busy = set()
    _ChatServer.requests = []
    with serving(_ChatServer) as url:
        yield url


def _conv(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": text}]


def test_openai_generator_keeps_order_sends_seeds_and_retries_429(chat_server: str) -> None:
    generator = OpenAIGenerator(chat_server + "/v1", "secret", "gen-model", max_workers=4,
                                backoff_s=0.01)
    texts = [f"passage {i}" for i in range(6)] + ["busy passage"]

    replies = generator.complete([_conv(t) for t in texts], temperature=0.5, max_new_tokens=12,
                                 seed=100)

    assert replies == [f"echo {t} seed={100 + i} max=12" for i, t in enumerate(texts)]
    requests = _ChatServer.requests
    assert len(requests) == 8  # one retry after the 429
    assert {r["path"] for r in requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in requests} == {"Bearer secret"}
    assert {r["body"]["model"] for r in requests} == {"gen-model"}
    generator.close()


def test_openai_generator_raises_on_client_errors_with_the_message(chat_server: str) -> None:
    generator = OpenAIGenerator(chat_server, None, "m", backoff_s=0.01)
    with pytest.raises(GeneratorError, match="400.*broken"):
        generator.complete([_conv("broken")], temperature=0.0, max_new_tokens=4, seed=0)
    assert _ChatServer.requests[0]["auth"] is None  # no key, no header
    assert len(_ChatServer.requests) == 1  # a 400 is not retried


def test_openai_generator_gives_up_after_retries_on_a_dead_endpoint() -> None:
    generator = OpenAIGenerator("http://127.0.0.1:9", None, "m", max_retries=1, backoff_s=0.01)
    with pytest.raises(GeneratorError, match="127.0.0.1:9"):
        generator.complete([_conv("x")], temperature=0.0, max_new_tokens=4, seed=0)


def test_load_generator_builds_openai_from_config(monkeypatch, chat_server: str) -> None:
    monkeypatch.setenv("MY_KEY", "k123")
    cfg = GenerationConfig(backend="openai", endpoint=chat_server, api_key_env="MY_KEY")
    generator = load_generator(cfg, "served-model")
    assert generator.complete([_conv("hi")], 0.0, 4, seed=1) == ["echo hi seed=1 max=4"]
    assert _ChatServer.requests[0]["auth"] == "Bearer k123"
    assert _ChatServer.requests[0]["body"]["model"] == "served-model"


# ---------------------------------------------------------------------------------------------
# VLLMGenerator


def test_vllm_backend_without_vllm_names_the_gpu_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(GeneratorError, match=r"tailor\[gpu\]"):
        load_generator(GenerationConfig(backend="vllm"), "/nonexistent")


def test_vllm_generator_sends_chat_with_per_request_seeds(monkeypatch, tmp_path) -> None:
    calls: dict = {}

    class FakeLLM:
        def __init__(self, model: str, **kwargs) -> None:
            calls["model"], calls["kwargs"] = model, kwargs

        def chat(self, conversations, sampling_params, use_tqdm):
            calls["params"] = sampling_params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"q{i}")])
                    for i, _ in enumerate(conversations)]

    class FakeParams:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, FakeParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")

    generator = VLLMGenerator.load(tmp_path / "model.gguf")
    replies = generator.complete([_conv("a"), _conv("b")], 0.8, 30, seed=10)

    assert replies == ["q0", "q1"]
    assert calls["model"].endswith("model.gguf")
    assert [p.kwargs for p in calls["params"]] == [
        {"temperature": 0.8, "max_tokens": 30, "seed": 10},
        {"temperature": 0.8, "max_tokens": 30, "seed": 11},
    ]
