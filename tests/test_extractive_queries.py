"""Extractive queries (a seeded sentence or span of the passage) and generation.cheap_passages,
which lets the extractive types cover more of the corpus than the generator's sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from ml_core.config import GenerationConfig, build_config
from ml_core.generation import generate_queries
from ml_core.generation.generate import MAX_EXTRACT_WORDS, MIN_EXTRACT_WORDS, extractive_query
from ml_core.pipeline import StageContext, run_stage, section_hash
from ml_core.records import Passage
from ml_core.registry import ModelRegistry
from tests.test_generation import ScriptedGenerator, _passages
from tests.test_pipeline import TINY_RECIPE

SENTENCES = [
    "The boundary layer thickens downstream of the leading edge .",
    "Heat transfer was measured at three Mach numbers in a blowdown tunnel .",
    "Skin friction falls as the Reynolds number rises over the plate .",
    "Results agree with theory .",  # four words: never drawn
]


def _words(text: str) -> list[str]:
    return text.replace(".", " ").split()


def test_an_extractive_query_is_a_seeded_sentence_of_the_passage() -> None:
    passage = Passage("p1", " ".join(SENTENCES))
    drawn = {seed: extractive_query(passage, seed) for seed in range(40)}
    expected = {" ".join(_words(s)) for s in SENTENCES[:3]}
    # Every long enough sentence is drawn for some seed, the short one never, and each comes
    # without Cranfield's detached full stop.
    assert set(drawn.values()) == expected
    assert all(extractive_query(passage, seed) == text for seed, text in drawn.items())
    # The draw is per passage: the same text under another id may give another sentence.
    moved = {extractive_query(Passage(f"q{seed}", passage.text), 13) for seed in range(40)}
    assert moved == expected


def test_a_long_sentence_gives_a_span_of_it() -> None:
    words = [f"w{i}" for i in range(60)]
    passage = Passage("long", " ".join(words) + ".")
    spans = [extractive_query(passage, seed) for seed in range(30)]
    for span in spans:
        cut = span.split()
        assert MIN_EXTRACT_WORDS <= len(cut) <= MAX_EXTRACT_WORDS
        start = words.index(cut[0])
        assert words[start:start + len(cut)] == cut  # consecutive words of the sentence
    assert len(set(spans)) > 10


def test_a_passage_without_a_sentence_of_five_words_gives_no_query() -> None:
    assert extractive_query(Passage("short", "Too short. Also short here."), 13) is None
    assert extractive_query(Passage("empty", "   "), 13) is None
    # An initial's full stop stays: only a sentence's own is dropped.
    text = extractive_query(Passage("init", "The method follows the work of dryden, h. l."), 1)
    assert text == "The method follows the work of dryden, h. l."
    text = extractive_query(Passage("end", "The method follows the work of h. l. dryden."), 1)
    assert text == "The method follows the work of h. l. dryden"


def test_extractive_only_passages_get_only_the_extractive_types_and_leave_generation_alone(
) -> None:
    sample = _passages(4)
    extra = [Passage(f"x{i}", f"Extra passage number {i} has a sentence of many words.",
                     title=f"Extra document title {i}") for i in range(3)]
    cfg = GenerationConfig(query_types=["questions", "extractive", "source_titles"],
                           batch_size=2)
    with_extra, plain = ScriptedGenerator(), ScriptedGenerator()
    queries = generate_queries(sample, cfg, with_extra, seed=3, extractive_only=extra)
    alone = generate_queries(sample, GenerationConfig(query_types=["questions"], batch_size=2),
                             plain, seed=3)
    # The generator sees exactly the calls it would without any extractive query.
    assert with_extra.calls == plain.calls and plain.calls
    assert [q for q in queries if q.query_type == "questions"] == alone
    extra_rows = [(q.id, q.query_type) for q in queries if q.source_id.startswith("x")]
    assert extra_rows == [(f"{t}:x{i}", t) for i in range(3)
                          for t in ("extractive", "source_titles")]
    assert queries[-len(extra_rows):] == [q for q in queries if q.source_id.startswith("x")]
    texts = {q.source_id: q.text for q in queries if q.query_type == "extractive"}
    assert texts["x1"] == "Extra passage number 1 has a sentence of many words"
    assert "id0" not in texts  # "doc0 end." has no sentence of five words


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ({"cheap_passages": 100}, r"query_types has none of them"),
        ({"cheap_passages": 100, "passages": 160, "query_types": ["questions", "extractive"]},
         r"cheap_passages \(100\) must be at least generation.passages \(160\)"),
        ({"cheap_passages": 0, "query_types": ["extractive"]}, r"cheap_passages"),
    ],
)
def test_cheap_passages_is_refused_where_it_cannot_apply(
    generation: dict, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        build_config("default", {"generation": generation})


def test_unset_cheap_passages_keeps_the_fingerprints_of_earlier_jobs() -> None:
    """generation.cheap_passages came after jobs had run: unset, prepare's and generate's hashes
    are the ones computed before it existed; set, both change."""
    import hashlib

    def old_hash(names: tuple[str, ...], config) -> str:
        data = config.model_dump(mode="json")
        del data["generation"]["cheap_passages"]
        picked = {}
        for name in names:
            section, _, field = name.partition(".")
            picked[name] = data[section][field] if field else data[section]
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()

    config = build_config("default", TINY_RECIPE)
    old_prepare = ("seed", "student", "corpus", "generation.passages",
                   "training.max_passage_length", "training.dev_fraction",
                   "evaluation.test_fraction")
    # generate reads the generation section, whose other added setting (synthetic) is neutral.
    config_data = config.model_dump(mode="json")
    assert config_data["generation"]["synthetic"] is True
    assert section_hash(config, "prepare") == old_hash(old_prepare, config)
    cheap = build_config("default", {**TINY_RECIPE, "generation": {
        **TINY_RECIPE["generation"], "query_types": ["questions", "extractive"]}})
    wider = build_config("default", {**TINY_RECIPE, "generation": {
        **TINY_RECIPE["generation"], "query_types": ["questions", "extractive"],
        "cheap_passages": 60}})
    assert section_hash(cheap, "prepare") == section_hash(config, "prepare")
    assert section_hash(wider, "prepare") != section_hash(cheap, "prepare")
    assert section_hash(wider, "generate") != section_hash(cheap, "generate")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield" / "corpus.jsonl"
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("\n".join(demo.read_text().splitlines()[:80]) + "\n")
    return path


def _sample(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "prepare" / "sample.jsonl").open()]


def test_cheap_passages_widen_the_extractive_sample_only(
    tmp_path: Path, corpus: Path, model_store: Path
) -> None:
    registry = ModelRegistry(model_store)
    types = ["keywords", "extractive"]
    recipe = {**TINY_RECIPE, "generation": {**TINY_RECIPE["generation"], "passages": 12,
                                            "query_types": types}}
    narrow = StageContext(tmp_path / "narrow", corpus, build_config("default", recipe), registry)
    recipe["generation"] = {**recipe["generation"], "cheap_passages": 10_000_000}
    wide = StageContext(tmp_path / "wide", corpus, build_config("default", recipe), registry)
    for ctx in (narrow, wide):
        run_stage("prepare", ctx)
    passages = [json.loads(line) for line in (wide.workdir / "prepare" / "passages.jsonl").open()]
    base, widened = _sample(narrow.workdir), _sample(wide.workdir)
    # The generator's sample and its splits are as without the setting; the rest of the corpus
    # follows, marked, and no document straddles two splits.
    assert widened[:len(base)] == base and len(base) == 12
    assert len(widened) == len(passages) > 2 * len(base)
    assert all(row.get("cheap_only") for row in widened[len(base):])
    document = {p["id"]: p.get("parent_id") or p["id"] for p in passages}
    split_of: dict[str, set[str]] = {}
    for row in widened:
        split_of.setdefault(document[row["id"]], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of.values())
    assert {row["split"] for row in widened[len(base):]} == {"train", "dev", "test"}

    # Generation: the generated type only on the sample; extractive queries on every passage.
    shutil.copytree(narrow.workdir / "prepare", tmp_path / "copy" / "prepare")
    run_stage("generate", narrow)
    run_stage("generate", wide)
    read = lambda ctx: [json.loads(x) for x in (ctx.workdir / "generate" / "queries.jsonl").open()]  # noqa: E731
    few, many = read(narrow), read(wide)
    assert [q for q in many if q["query_type"] == "keywords"] == [
        q for q in few if q["query_type"] == "keywords"]
    extractive = [q for q in many if q["query_type"] == "extractive"]
    assert len(extractive) > 2 * sum(q["query_type"] == "extractive" for q in few)
    splits = {row["id"]: row["split"] for row in widened}
    assert all(q["split"] == splits[q["source_id"]] for q in many)
    manifest = json.loads((wide.workdir / "prepare" / "manifest.json").read_text())
    assert manifest["counts"]["cheap_sampled"] == len(widened)

    # The filter and training take the extra queries like any other.
    run_stage("filter", wide)
    kept = [json.loads(x) for x in (wide.workdir / "filter" / "queries.jsonl").open()]
    assert any(q["source_id"] not in {row["id"] for row in base} for q in kept)

    # bench.teacher_cost rebuilds exactly the pairs this filter scored, and times a teacher.
    from bench.teacher_cost import job_pairs, time_teacher

    lists = job_pairs(wide.workdir)
    summary = json.loads((wide.workdir / "filter" / "filter.json").read_text())
    assert len(lists) == len(many)
    assert sum(map(len, lists.values())) == summary["pairs_scored"]
    timing = time_teacher("tiny-teacher", registry, lists[many[0]["id"]])
    assert timing["pairs"] == len(lists[many[0]["id"]]) and timing["seconds"] >= 0
