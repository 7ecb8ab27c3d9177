"""The whole recipe on tiny models: every stage, resume by manifest, and invalidation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ml_core.__main__ import main as cli_main
from ml_core.config import RecipeConfig, build_config
from ml_core.pipeline import STAGES, StageContext, StageError, is_finished, run_stage
from ml_core.registry import ModelRegistry
from ml_core.student import resolve_precision
from tests.tiny_models import TINY_HYPERPARAMETERS

DEMO = Path(__file__).resolve().parents[1] / "demo" / "cranfield"

TINY_RECIPE = {
    "student": "tiny-student",
    "teacher": "tiny-teacher",
    "generator": "tiny-generator",
    **TINY_HYPERPARAMETERS,
    "generation": {
        **TINY_HYPERPARAMETERS["generation"],
        "passages": 40,
        "query_types": ["questions", "keywords"],
    },
}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = (DEMO / "corpus.jsonl").read_text().splitlines()[:80]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, small_corpus: Path, model_store: Path
) -> StageContext:
    workdir = tmp_path_factory.mktemp("run")
    ctx = StageContext(
        workdir, small_corpus, build_config("default", TINY_RECIPE), ModelRegistry(model_store)
    )
    for stage in STAGES:
        assert not run_stage(stage, ctx).skipped
    return ctx


def test_every_stage_writes_its_artifacts_and_manifest(finished_run: StageContext) -> None:
    for stage in STAGES:
        manifest = json.loads((finished_run.stage_dir(stage) / "manifest.json").read_text())
        assert manifest["stage"] == stage
    counts = json.loads((finished_run.stage_dir("prepare") / "manifest.json").read_text())["counts"]
    assert counts["documents"] == 80 and counts["sampled"] == 40
    queries = (finished_run.stage_dir("generate") / "queries.jsonl").read_text().splitlines()
    types = {json.loads(line)["query_type"] for line in queries}
    assert types == {"questions", "keywords"}
    report = json.loads((finished_run.stage_dir("evaluate") / "report.json").read_text())
    assert report["judgements"] == "synthetic"
    assert 0.0 <= report["base"]["ndcg@10"] <= 1.0 and 0.0 <= report["tuned"]["ndcg@10"] <= 1.0
    assert report["recommended"] in ("tuned", "base")
    history = json.loads((finished_run.stage_dir("distill") / "history.json").read_text())
    assert report["base_kept"] is (history["best_epoch"] == 0)
    assert (finished_run.stage_dir("distill") / "model" / "modules.json").exists()
    # Every teacher score is kept, dropped queries' too, and agrees with the kept lists.
    filter_dir = finished_run.stage_dir("filter")
    audit = {
        row["query_id"]: dict(zip(row["passage_ids"], row["raw_scores"], strict=True))
        for row in map(json.loads, (filter_dir / "teacher_scores.jsonl").open())
    }
    kept = [json.loads(line) for line in (filter_dir / "candidates.jsonl").open()]
    assert len(audit) >= len(kept) > 0
    for row in kept:
        for pid, raw in zip(row["passage_ids"], row["raw_scores"], strict=True):
            assert audit[row["query_id"]][pid] == raw


def test_test_passages_are_never_trained_on(finished_run: StageContext) -> None:
    sample = [json.loads(x) for x in (finished_run.stage_dir("prepare") / "sample.jsonl").open()]
    test_ids = {row["id"] for row in sample if row["split"] == "test"}
    assert test_ids
    queries = {
        json.loads(x)["id"]: json.loads(x)
        for x in (finished_run.stage_dir("filter") / "queries.jsonl").open()
    }
    for line in (finished_run.stage_dir("filter") / "candidates.jsonl").open():
        scored = json.loads(line)
        query = queries[scored["query_id"]]
        if query["split"] == "test":
            assert query["source_id"] in test_ids
        else:
            assert query["source_id"] not in test_ids


def test_rerun_skips_finished_stages(finished_run: StageContext) -> None:
    for stage in STAGES:
        assert run_stage(stage, finished_run).skipped


def test_changed_training_setting_reruns_only_downstream(
    finished_run: StageContext, tmp_path: Path
) -> None:
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run.workdir, workdir)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["training"]["learning_rate"] = 1e-4
    ctx = StageContext(
        workdir, finished_run.corpus_path, build_config("default", recipe), finished_run.registry
    )
    skipped = {stage: run_stage(stage, ctx).skipped for stage in STAGES}
    assert skipped == {
        "prepare": True,
        "generate": True,
        "filter": True,
        "distill": False,
        "evaluate": False,
    }


def test_encode_precision_reruns_filter_and_evaluate_and_is_reported(
    finished_run: StageContext, tmp_path: Path
) -> None:
    first = json.loads((finished_run.stage_dir("evaluate") / "report.json").read_text())
    assert first["encode_precision"] == resolve_precision("auto")
    generated = json.loads((finished_run.stage_dir("generate") / "manifest.json").read_text())
    assert generated["counts"]["precision"] == resolve_precision("auto")
    distilled = json.loads((finished_run.stage_dir("distill") / "manifest.json").read_text())
    assert distilled["counts"]["precision"] == resolve_precision("auto")
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run.workdir, workdir)
    results = {}
    for precision in ("fp32", "bf16"):
        ctx = StageContext(
            workdir,
            finished_run.corpus_path,
            build_config("default", {**TINY_RECIPE, "encode_precision": precision}),
            finished_run.registry,
        )
        skipped = {stage: run_stage(stage, ctx).skipped for stage in STAGES}
        assert skipped == {"prepare": True, "generate": True, "filter": False,
                           "distill": False, "evaluate": False}
        report = json.loads((ctx.stage_dir("evaluate") / "report.json").read_text())
        assert report["encode_precision"] == precision
        results[precision] = np.load(ctx.stage_dir("filter") / "base_passage_vectors.npy")
    cosines = (results["fp32"] * results["bf16"]).sum(axis=1)
    assert cosines.min() > 0.999 and not np.array_equal(results["fp32"], results["bf16"])


@pytest.mark.parametrize(
    ("section", "key", "value", "first_stale"),
    [
        ("generation", "passages", 30, "prepare"),  # the sample is drawn in prepare
        ("training", "max_passage_length", 48, "prepare"),  # chunking follows it
        ("generation", "temperature", 0.5, "generate"),
        ("generation", "precision", "fp32", "generate"),
        ("training", "precision", "fp32", "distill"),
        ("candidates", "top_k", 6, "filter"),
        ("candidates", "helpers", ["bge-small"], "filter"),
        ("evaluation", "teacher_check_queries", 5, "evaluate"),
    ],
)
def test_a_setting_invalidates_the_first_stage_that_reads_it(
    finished_run: StageContext, section: str, key: str, value: object, first_stale: str
) -> None:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe.setdefault(section, {})[key] = value
    ctx = StageContext(
        finished_run.workdir,
        finished_run.corpus_path,
        build_config("default", recipe),
        finished_run.registry,
    )
    stale = [stage for stage in STAGES if not is_finished(stage, ctx)]
    assert stale and stale[0] == first_stale


def test_stage_refuses_to_run_before_its_inputs(
    tmp_path: Path, small_corpus: Path, model_store: Path
) -> None:
    ctx = StageContext(
        tmp_path, small_corpus, build_config("default", TINY_RECIPE), ModelRegistry(model_store)
    )
    with pytest.raises(StageError, match="prepare"):
        run_stage("generate", ctx)


def test_customer_judgements_are_used_when_given(
    finished_run: StageContext, tmp_path: Path
) -> None:
    workdir = tmp_path / "judged"
    shutil.copytree(finished_run.workdir, workdir)
    corpus_ids = [json.loads(x)["_id"] for x in finished_run.corpus_path.open()]
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"_id": f"q{i}", "text": f"flow over a wing {i}"}) + "\n" for i in range(3)
        )
    )
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{corpus_ids[i]}\t1\n" for i in range(3))
    )
    ctx = StageContext(
        workdir,
        finished_run.corpus_path,
        finished_run.config,
        finished_run.registry,
        queries,
        qrels,
    )
    assert not run_stage("evaluate", ctx).skipped
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    assert report["judgements"] == "customer"


def test_cli_runs_a_stage_and_prints_the_table(
    finished_run: StageContext,
    tmp_path: Path,
    model_store: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    workdir = tmp_path / "cli"
    shutil.copytree(finished_run.workdir, workdir)
    shutil.rmtree(workdir / "evaluate")
    config = tmp_path / "recipe.yaml"
    config.write_text(json.dumps(TINY_RECIPE))  # JSON is YAML
    code = cli_main(
        [
            "run",
            "--corpus",
            str(finished_run.corpus_path),
            "--out",
            str(workdir),
            "--config",
            str(config),
            "--store",
            str(model_store),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "prepare: already finished" in out and "recommended:" in out
    base_vectors = np.load(workdir / "filter" / "base_passage_vectors.npy")
    assert (
        base_vectors.shape[0]
        == json.loads((workdir / "prepare" / "manifest.json").read_text())["counts"]["passages"]
    )


def test_relabeled_disagreements_join_training_only_when_asked(
    finished_run: StageContext, tmp_path: Path
) -> None:
    workdir = tmp_path / "relabel"
    shutil.copytree(finished_run.workdir, workdir)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    # With the round trip on, the tiny random teacher disagrees with the generator often (its
    # scores alone: fused with the first stage's ranks it would agree with more of them).
    recipe["candidates"].update(
        round_trip=True, student_top_n=1000, teacher_signal="cross_encoder"
    )

    def run(**training: object) -> int:
        recipe["training"].update(training)
        ctx = StageContext(
            workdir, finished_run.corpus_path, build_config("default", recipe),
            finished_run.registry,
        )
        for stage in ("filter", "distill"):
            run_stage(stage, ctx)
        manifest = json.loads((ctx.stage_dir("distill") / "manifest.json").read_text())
        return manifest["counts"]["train_queries"]

    plain = run()
    sample = map(json.loads, (workdir / "prepare" / "sample.jsonl").open())
    splits = {row["id"]: row["split"] for row in sample}
    queries = {
        row["id"]: row for row in map(json.loads, (workdir / "generate/queries.jsonl").open())
    }
    relabeled = [json.loads(line) for line in (workdir / "filter/relabeled.jsonl").open()]
    for row in relabeled:  # relabelled: the list's positive is the teacher's, not the source
        assert row["passage_ids"][0] != queries[row["query_id"]]["source_id"]
    usable = [
        row for row in relabeled
        if queries[row["query_id"]]["split"] == "train"
        and splits.get(row["passage_ids"][0]) != "test"
    ]
    assert usable and len(usable) < len(relabeled)  # dev/test queries and positives stay out
    assert run(relabel_disagreements=True) == plain + len(usable)

    (workdir / "filter" / "relabeled.jsonl").unlink()  # a filter run from before the option
    with pytest.raises(StageError, match="relabeled.jsonl"):
        run(learning_rate=1e-4)


def test_extractive_query_types_alone_load_no_generator(
    finished_run: StageContext, tmp_path: Path
) -> None:
    shutil.copytree(finished_run.workdir / "prepare", tmp_path / "prepare")
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["generation"]["query_types"] = ["source_titles"]
    recipe["generator"] = "no-such-generator"  # loading it would fail
    ctx = StageContext(tmp_path, finished_run.corpus_path, build_config("default", recipe),
                       finished_run.registry)
    assert is_finished("prepare", ctx)
    run_stage("generate", ctx)
    rows = [json.loads(line) for line in (tmp_path / "generate" / "queries.jsonl").open()]
    assert rows and {row["query_type"] for row in rows} == {"source_titles"}
    recipe["generation"]["query_types"] = ["source_titles", "questions"]
    ctx = StageContext(tmp_path, finished_run.corpus_path, build_config("default", recipe),
                       finished_run.registry)
    with pytest.raises(Exception, match="no-such-generator"):
        run_stage("generate", ctx)


def test_evaluate_scores_a_kept_base_once(finished_run: StageContext, tmp_path: Path) -> None:
    """When training never beat the base (best epoch 0, so the export is the base's weights),
    evaluate does not encode the corpus a second time: the tuned row is the base's row."""
    workdir = tmp_path / "kept"
    shutil.copytree(finished_run.workdir, workdir)
    history_path = workdir / "distill" / "history.json"
    history = json.loads(history_path.read_text())
    assert history["best_epoch"] > 0
    # The trained model stays in distill/model, so a second encoding would score differently.
    history["best_epoch"] = 0
    history_path.write_text(json.dumps(history))
    shutil.rmtree(workdir / "evaluate")
    messages: list[str] = []
    ctx = StageContext(
        workdir, finished_run.corpus_path, finished_run.config, finished_run.registry,
        progress=lambda fraction, message: messages.append(message),
    )
    assert not run_stage("evaluate", ctx).skipped
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    assert report["base_kept"] is True and report["recommended"] == "base"
    assert report["tuned"] == report["base"]
    # The tiny corpus's dev split is far below what selects reliably, and the report says so.
    dev_queries = json.loads((workdir / "distill" / "manifest.json").read_text())["counts"][
        "dev_queries"]
    assert 0 < dev_queries < 30
    assert any(f"only {dev_queries} dev queries" in w for w in report["warnings"])
    assert "evaluating tuned model" not in messages
    assert any("training kept the base model" in m for m in messages)
    # The set-ups then stand on the base alone: no tuned rows copied from it.
    section = report["retrievers"]
    assert section["reference"] == "base-chunks"
    assert not any(row["model"] == "tuned" for row in section["rows"])
    trained = json.loads((finished_run.stage_dir("evaluate") / "report.json").read_text())
    assert trained["base"] == report["base"] and trained["tuned"] != trained["base"]


@pytest.mark.parametrize("tune", ["queries", "passages"])
def test_one_side_tuning_is_evaluated_with_the_base_on_the_other_side(
    finished_run: StageContext, tmp_path: Path, tune: str
) -> None:
    """training.tune "queries" ("passages"): the report's tuned rows search with the tuned
    query (passage) side and the base's passage (query) side; only distill and evaluate run
    again."""
    from ml_core.evaluation import evaluate_retriever
    from ml_core.stages.context import load_passages
    from ml_core.stages.evaluate import TwoTowers, _synthetic_judgements
    from ml_core.student import Student

    workdir = tmp_path / tune
    shutil.copytree(finished_run.workdir, workdir)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe.setdefault("training", {})["tune"] = tune
    ctx = StageContext(workdir, finished_run.corpus_path, build_config("default", recipe),
                       finished_run.registry)
    skipped = {stage: run_stage(stage, ctx).skipped for stage in STAGES}
    assert [stage for stage, was in skipped.items() if not was] == ["distill", "evaluate"]
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    assert report["recipe"]["training"]["tune"] == tune
    base = Student.load(finished_run.registry.path("tiny-student"))
    tuned = Student.load(workdir / "distill" / "model")
    passages = load_passages(ctx)
    queries, _, qrels = _synthetic_judgements(ctx, passages)
    if tune == "queries":
        model = TwoTowers(tuned, base)
        vectors = np.load(workdir / "filter" / "base_passage_vectors.npy")
    else:
        model = TwoTowers(base, tuned)
        vectors = tuned.encode_passages(passages)
    expected = evaluate_retriever(model, passages, queries, qrels, passage_vectors=vectors)
    assert report["tuned"]["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-9)


def test_base_merge_averages_the_best_checkpoint_without_training_again(
    finished_run: StageContext, tmp_path: Path
) -> None:
    import torch

    from ml_core.student import Student

    workdir = tmp_path / "merge"
    shutil.copytree(finished_run.workdir, workdir)
    history = json.loads((workdir / "distill" / "history.json").read_text())
    assert history["best_epoch"] > 0
    assert history["base_merge"] == finished_run.config.training.base_merge != 0.25
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["training"]["base_merge"] = 0.25
    messages: list[str] = []
    ctx = StageContext(
        workdir, finished_run.corpus_path, build_config("default", recipe), finished_run.registry,
        progress=lambda fraction, message: messages.append(message),
    )
    skipped = {stage: run_stage(stage, ctx).skipped for stage in STAGES}
    assert [stage for stage, was in skipped.items() if not was] == ["distill", "evaluate"]
    # The finished training run was reused (no optimizer step), only the export changed.
    assert not any(" step " in message for message in messages)
    assert any("averaging" in message for message in messages)
    best = Student.load(workdir / "distill" / "best").state_dict()
    base = Student.load(finished_run.registry.path("tiny-student")).state_dict()
    merged = Student.load(workdir / "distill" / "model").state_dict()
    changed = 0
    for name, tensor in merged.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, 0.75 * best[name] + 0.25 * base[name], atol=1e-6), name
            changed += not torch.equal(best[name], base[name])
    assert changed  # training moved some weights, so the average differs from both ends
    assert json.loads((workdir / "distill" / "history.json").read_text())["base_merge"] == 0.25
    exported = json.loads((workdir / "distill" / "model" / "training_config.json").read_text())
    assert exported["training"]["base_merge"] == 0.25


def _store_with_helper(finished_run: StageContext, root: Path) -> ModelRegistry:
    """The tiny store plus `tiny-helper`: the tiny student with its weights perturbed, so a
    second bi-encoder that ranks differently."""
    import torch
    from transformers import BertModel

    from ml_core.registry import ModelSpec
    from tests.tiny_models import _save_spec

    for name in finished_run.registry.names():
        (root / name).symlink_to(finished_run.registry.folder(name))
    helper = root / "tiny-helper"
    shutil.copytree(finished_run.registry.folder("tiny-student"), helper)
    model = BertModel.from_pretrained(helper, add_pooling_layer=False)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    model.save_pretrained(helper)
    spec = ModelSpec.read(helper).model_copy(update={"name": "tiny-helper"})
    _save_spec(helper, spec)
    return ModelRegistry(root)


def test_helper_retrievers_widen_the_candidates_and_are_recorded(
    finished_run: StageContext, tmp_path: Path
) -> None:
    (tmp_path / "models").mkdir()
    registry = _store_with_helper(finished_run, tmp_path / "models")
    workdir = tmp_path / "helped"
    for stage in ("prepare", "generate"):
        shutil.copytree(finished_run.stage_dir(stage), workdir / stage)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    # The student named as a helper is skipped: its list is always in the fusion.
    recipe["candidates"]["helpers"] = ["tiny-helper", "tiny-student"]
    messages: list[str] = []
    ctx = StageContext(workdir, finished_run.corpus_path, build_config("default", recipe),
                       registry, progress=lambda fraction, message: messages.append(message))
    assert run_stage("prepare", ctx).skipped and run_stage("generate", ctx).skipped
    assert not run_stage("filter", ctx).skipped

    summary = json.loads((workdir / "filter" / "filter.json").read_text())
    assert summary["helpers"] == ["tiny-helper"]
    assert any("helper 'tiny-helper'" in message for message in messages)
    before = json.loads((finished_run.stage_dir("filter") / "filter.json").read_text())
    assert before["helpers"] == []
    # A third ranking in the fusion moves some query's candidate list.
    lists = {}
    for run in (finished_run.stage_dir("filter"), workdir / "filter"):
        rows = (json.loads(line) for line in (run / "teacher_scores.jsonl").open())
        lists[run] = {row["query_id"]: row["passage_ids"] for row in rows}
    old, new = lists.values()
    assert old.keys() == new.keys() and any(old[q] != new[q] for q in old)


@pytest.mark.parametrize(
    ("helper", "message"),
    [("no-such-model", "candidates.helpers: unknown model 'no-such-model'"),
     ("tiny-teacher", "candidates.helpers: model 'tiny-teacher' is a teacher, not a bi-encoder")],
)
def test_a_helper_that_is_not_a_registered_bi_encoder_is_named(
    finished_run: StageContext, tmp_path: Path, helper: str, message: str
) -> None:
    for stage in ("prepare", "generate"):
        shutil.copytree(finished_run.stage_dir(stage), tmp_path / stage)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["candidates"]["helpers"] = [helper]
    ctx = StageContext(tmp_path, finished_run.corpus_path, build_config("default", recipe),
                       finished_run.registry)
    with pytest.raises(StageError, match=message):
        run_stage("filter", ctx)
    assert not (tmp_path / "filter" / "manifest.json").exists()


def _hash_without(config: RecipeConfig, stage: str, *removed: tuple[str, str]) -> str:
    """The stage's settings hash computed as before the `removed` settings existed."""
    import hashlib

    from ml_core.pipeline import _STAGE_SECTIONS

    before = config.model_dump(mode="json")
    for section, key in removed:
        del before[section][key]
    picked = {}
    for name in _STAGE_SECTIONS[stage]:
        section, _, field = name.partition(".")
        picked[name] = before[section][field] if field else before[section]
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def test_a_setting_added_later_leaves_the_fingerprints_of_earlier_stages_alone() -> None:
    """candidates.helpers, co_teachers and round_trip_scope came after jobs had run: at their
    neutral values (no helpers, the passage round trip) the filter's hash is the one computed
    before the settings existed, so a resumed job is not re-filtered."""
    from ml_core.pipeline import section_hash

    config = build_config("default", TINY_RECIPE)
    assert config.candidates.helpers == [] and config.candidates.round_trip_scope == "passage"
    old = _hash_without(config, "filter", ("candidates", "helpers"),
                        ("candidates", "round_trip_scope"), ("candidates", "co_teachers"),
                        ("candidates", "easy_k"), ("candidates", "easy_depth"))
    assert section_hash(config, "filter") == old
    helped = build_config("default", {**TINY_RECIPE, "candidates": {
        **TINY_RECIPE["candidates"], "helpers": ["bge-small"]}})
    assert section_hash(helped, "filter") != old
    mixed = build_config("default", {**TINY_RECIPE, "candidates": {
        **TINY_RECIPE["candidates"], "easy_k": 2}})
    assert section_hash(mixed, "filter") != old


def test_training_all_layers_keeps_the_distill_fingerprint_of_earlier_jobs() -> None:
    """training.train_layers, tune and base_anchor came after jobs had run: unset, "both" or 0
    (every layer of one encoder trains, unpulled, as before) they stay out of the distill
    stage's hash; set, they change it."""
    from ml_core.pipeline import section_hash

    config = build_config("default", TINY_RECIPE)
    old = _hash_without(config, "distill", ("training", "train_layers"), ("training", "tune"),
                        ("training", "base_anchor"),
                        ("candidates", "helpers"), ("candidates", "co_teachers"),
                        ("candidates", "easy_k"), ("candidates", "easy_depth"),
                        ("candidates", "round_trip_scope"), ("generation", "synthetic"))
    assert section_hash(config, "distill") == old
    frozen = build_config("default", {**TINY_RECIPE, "training": {
        **TINY_RECIPE.get("training", {}), "train_layers": 2}})
    assert section_hash(frozen, "distill") != old
    queries_only = build_config("default", {**TINY_RECIPE, "training": {
        **TINY_RECIPE.get("training", {}), "tune": "queries"}})
    assert section_hash(queries_only, "distill") != old
    pulled = build_config("default", {**TINY_RECIPE, "training": {
        **TINY_RECIPE.get("training", {}), "base_anchor": 1.0}})
    assert section_hash(pulled, "distill") != old



def _queries_file(path: Path, texts: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in texts.items()))
    return path


def test_supplied_queries_train_beside_synthetic_ones_and_leave_the_evaluation(
    finished_run: StageContext, tmp_path: Path
) -> None:
    """A customer's own unjudged queries (a search log) join training with the teacher's #1 as
    their positive; a judged query that is also one of them is not graded."""
    workdir = tmp_path / "supplied"
    shutil.copytree(finished_run.workdir, workdir)
    log = _queries_file(tmp_path / "log.jsonl", {
        "a": "wing flutter at high speed", "b": "Wing  FLUTTER at high speed",  # a repeat
        "c": "heat transfer in a boundary layer", "d": "shock waves on a cone",
        "e": "pressure on a flat plate", "f": "flow over a wing 1",
    })
    corpus_ids = [json.loads(x)["_id"] for x in finished_run.corpus_path.open()]
    judged = _queries_file(tmp_path / "judged.jsonl",
                           {f"q{i}": f"flow over a wing {i}" for i in range(3)})
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("".join(f"q{i}\t{corpus_ids[i]}\t1\n" for i in range(3)))
    ctx = StageContext(workdir, finished_run.corpus_path, finished_run.config,
                       finished_run.registry, judged, qrels, train_queries=log)

    assert run_stage("prepare", ctx).skipped
    assert not run_stage("generate", ctx).skipped  # the supplied queries are one of its inputs
    generated = [json.loads(x) for x in (workdir / "generate" / "queries.jsonl").open()]
    before = [json.loads(x) for x in (finished_run.stage_dir("generate") / "queries.jsonl").open()]
    assert generated[: len(before)] == before  # the synthetic queries are unchanged
    supplied = generated[len(before):]
    assert [q["id"] for q in supplied] == [f"supplied:{k}" for k in "acdef"]
    assert {(q["query_type"], q["source_id"], q["split"]) for q in supplied} == {
        ("supplied", "", "")}
    for stage in ("filter", "distill", "evaluate"):
        assert not run_stage(stage, ctx).skipped
    lists = {json.loads(x)["query_id"]: json.loads(x)
             for x in (workdir / "filter" / "candidates.jsonl").open()}
    kept = [lists[q["id"]] for q in supplied if q["id"] in lists]
    assert kept, "the filter kept none of the supplied queries"
    for scored in kept:  # positive first: the teacher signal's best in its list
        assert scored["teacher_scores"][0] == max(scored["teacher_scores"])
    trained = json.loads((workdir / "distill" / "manifest.json").read_text())["counts"]
    alone = json.loads((finished_run.stage_dir("distill") / "manifest.json").read_text())["counts"]
    test_ids = {json.loads(x)["id"] for x in (workdir / "prepare" / "sample.jsonl").open()
                if json.loads(x)["split"] == "test"}
    usable = sum(1 for scored in kept if scored["passage_ids"][0] not in test_ids)
    assert (trained["train_queries"] + trained["dev_queries"]
            == alone["train_queries"] + alone["dev_queries"] + usable)
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    assert report["excluded_trained_queries"] == 1
    assert report["base"]["queries"] == 2 and set(report["per_query"]) == {"q0", "q2"}


def test_example_queries_prompt_beside_their_bm25_passage_and_leave_the_evaluation(
    finished_run: StageContext, tmp_path: Path
) -> None:
    """A job given a handful of the customer's queries writes like_examples queries, each
    example shown beside the passage BM25 ranks first for it; one that shares no word with the
    corpus is dropped, and a judged query that is an example is not graded."""
    examples = ["aerodynamics of a wing in a propeller slipstream",
                "boundary layer in simple shear flow past a flat plate",
                "zzqx wvvq"]
    config = build_config("default", {**TINY_RECIPE, "generation": {
        **TINY_RECIPE["generation"], "query_types": ["like_examples"],
        "example_queries": examples}})
    corpus_ids = [json.loads(x)["_id"] for x in finished_run.corpus_path.open()]
    judged = _queries_file(tmp_path / "judged.jsonl", {
        "q0": "Aerodynamics of a wing  in a propeller SLIPSTREAM", "q1": "flow over a wing",
        "q2": "heat transfer at a stagnation point"})
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("".join(f"q{i}\t{corpus_ids[i]}\t1\n" for i in range(3)))
    workdir = tmp_path / "examples"
    shutil.copytree(finished_run.workdir / "prepare", workdir / "prepare")
    ctx = StageContext(workdir, finished_run.corpus_path, config, finished_run.registry, judged,
                       qrels)

    assert run_stage("prepare", ctx).skipped
    assert not run_stage("generate", ctx).skipped
    shown = [json.loads(x) for x in (workdir / "generate" / "examples.jsonl").open()]
    assert [(row["query"], row["passage_id"].split("#")[0]) for row in shown] == [
        (examples[0], "1"), (examples[1], "3")]
    manifest = json.loads((workdir / "generate" / "manifest.json").read_text())["counts"]
    assert manifest["example_queries"] == 2
    generated = [json.loads(x) for x in (workdir / "generate" / "queries.jsonl").open()]
    assert generated and {q["query_type"] for q in generated} == {"like_examples"}
    for stage in ("filter", "distill", "evaluate"):
        assert not run_stage(stage, ctx).skipped
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    assert report["excluded_trained_queries"] == 1
    assert set(report["per_query"]) == {"q1", "q2"}


def test_without_synthetic_queries_a_job_trains_on_the_supplied_ones_alone(
    finished_run: StageContext, tmp_path: Path
) -> None:
    config = build_config("default", {**TINY_RECIPE, "generation": {
        **TINY_RECIPE["generation"], "synthetic": False}})
    workdir = tmp_path / "log-only"
    shutil.copytree(finished_run.workdir, workdir)
    ctx = StageContext(workdir, finished_run.corpus_path, config, finished_run.registry)
    with pytest.raises(StageError, match="no training queries were given"):
        run_stage("generate", ctx)
    log = _queries_file(tmp_path / "log.jsonl", {
        f"l{i}": text for i, text in enumerate(
            ["wing flutter", "heat transfer to a plate", "shock wave angle", "boundary layer",
             "pressure distribution", "supersonic cone", "laminar flow", "turbulent jet"])})
    ctx.train_queries = log
    assert not run_stage("generate", ctx).skipped
    types = {json.loads(x)["query_type"] for x in (workdir / "generate" / "queries.jsonl").open()}
    assert types == {"supplied"}
    assert not run_stage("filter", ctx).skipped
    assert not run_stage("distill", ctx).skipped
    counts = json.loads((workdir / "distill" / "manifest.json").read_text())["counts"]
    assert counts["train_queries"] >= 1
    with pytest.raises(StageError, match="without synthetic queries .* needs judgements"):
        run_stage("evaluate", ctx)


def test_a_bad_supplied_queries_line_is_named(finished_run: StageContext, tmp_path: Path) -> None:
    workdir = tmp_path / "bad"
    shutil.copytree(finished_run.workdir, workdir)
    log = tmp_path / "log.jsonl"
    log.write_text('{"_id": "a", "text": "wing"}\n{"_id": "b"}\n')
    ctx = StageContext(workdir, finished_run.corpus_path, finished_run.config,
                       finished_run.registry, train_queries=log)
    with pytest.raises(ValueError, match=r"log\.jsonl.*line 2.*text"):
        run_stage("generate", ctx)


def test_co_teachers_score_beside_the_teacher_in_the_filter(
    finished_run: StageContext, tmp_path: Path
) -> None:
    """teacher_signal "teachers_fused" with a late-interaction co-teacher: both teachers score
    every pair, each one's raw scores are kept, and the lists train on their average."""
    from tests.tiny_colbert import build_tiny_colbert

    spec, _ = build_tiny_colbert(tmp_path / "models" / "tiny-colbert")
    registry = ModelRegistry(finished_run.registry.store, extra={"tiny-colbert": spec.folder})
    workdir = tmp_path / "both"
    for stage in ("prepare", "generate"):
        shutil.copytree(finished_run.stage_dir(stage), workdir / stage)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["candidates"].update(teacher_signal="teachers_fused", co_teachers=["tiny-colbert"])
    ctx = StageContext(workdir, finished_run.corpus_path, build_config("default", recipe),
                       registry)
    assert not run_stage("filter", ctx).skipped
    summary = json.loads((workdir / "filter" / "filter.json").read_text())
    assert summary["teachers"] == 2 and summary["co_teachers"] == ["tiny-colbert"]
    rows = [json.loads(line) for line in (workdir / "filter" / "teacher_scores.jsonl").open()]
    alone = {json.loads(line)["query_id"]: json.loads(line) for line in
             (finished_run.stage_dir("filter") / "teacher_scores.jsonl").open()}
    for row in rows:
        cross, late = row["teacher_raw_scores"]
        assert len(cross) == len(late) == len(row["passage_ids"]) == len(row["raw_scores"])
        # The job's teacher scores as it does alone; the average is another scale.
        assert row["passage_ids"] == alone[row["query_id"]]["passage_ids"]
        assert cross == pytest.approx(alone[row["query_id"]]["raw_scores"], abs=1e-5)
        assert row["raw_scores"] != cross
    recipe["candidates"]["co_teachers"] = ["tiny-student"]
    wrong = StageContext(tmp_path / "wrong", finished_run.corpus_path,
                         build_config("default", recipe), registry)
    for stage in ("prepare", "generate"):
        shutil.copytree(finished_run.stage_dir(stage), wrong.workdir / stage)
    with pytest.raises(StageError, match="co_teachers: model 'tiny-student' is a student"):
        run_stage("filter", wrong)


def test_a_late_interaction_teacher_runs_a_whole_job(
    finished_run: StageContext, tmp_path: Path
) -> None:
    """`teacher` names a late-interaction model: the filter scores with it (its MaxSim scores
    are the raw scores), training runs on its lists, and the report's teacher check is its."""
    from ml_core.candidates import passage_text
    from ml_core.teacher import load_teacher
    from tests.tiny_colbert import build_tiny_colbert

    spec, _ = build_tiny_colbert(tmp_path / "models" / "tiny-colbert")
    registry = ModelRegistry(finished_run.registry.store, extra={"tiny-colbert": spec.folder})
    workdir = tmp_path / "late"
    for stage in ("prepare", "generate"):
        shutil.copytree(finished_run.stage_dir(stage), workdir / stage)
    recipe = {**json.loads(json.dumps(TINY_RECIPE)), "teacher": "tiny-colbert"}
    ctx = StageContext(workdir, finished_run.corpus_path, build_config("default", recipe),
                       registry)
    for stage in ("filter", "distill", "evaluate"):
        assert not run_stage(stage, ctx).skipped
    row = json.loads((workdir / "filter" / "teacher_scores.jsonl").open().readline())
    queries = {json.loads(line)["id"]: json.loads(line)["text"]
               for line in (workdir / "generate" / "queries.jsonl").open()}
    from ml_core.stages.context import load_passages

    by_id = {p.id: p for p in load_passages(ctx)}
    pairs = [(queries[row["query_id"]], passage_text(by_id[pid])) for pid in row["passage_ids"]]
    teacher = load_teacher(registry.get("tiny-colbert"), device="cpu")
    assert row["raw_scores"] == pytest.approx(list(teacher.score(pairs)), abs=1e-4)
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    assert report["models"]["teacher"] == "tiny-colbert"
    check = report["teacher_check"]
    assert check["queries"] > 0 and 0.0 <= check["teacher"] <= 1.0


def test_the_report_compares_bm25_hybrid_and_whole_documents_on_its_own_queries(
    finished_run: StageContext,
) -> None:
    """The evaluate stage's set-up rows: the chunk rows are the report's base and tuned rows,
    every row is scored on the same queries, and the best row names its parameters."""
    report = json.loads((finished_run.stage_dir("evaluate") / "report.json").read_text())
    assert report["version"] == 2
    section = report["retrievers"]
    rows = {row["id"]: row for row in section["rows"]}
    assert section["reference"] == "tuned-chunks" and section["fusion"]["k"] == 60
    for model in ("base", "tuned"):
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            assert rows[f"{model}-chunks"][metric] == pytest.approx(report[model][metric])
        assert f"{model}+bm25-chunks" in rows
    assert rows["tuned-chunks"]["setup"] == "tuned, chunks of 64 tokens, max over chunks"
    assert {row["queries"] for row in rows.values()} == {report["tuned"]["queries"]}
    # Demo documents are longer than the tiny recipe's 64-token chunks: whole rows are there.
    assert section["chunked_documents"] > 0 and "tuned-whole" in rows
    assert "base-whole" in rows and section["whole_gain"]["models"] == ["base", "tuned"]
    assert section["encoded_documents"] == 2 * section["chunked_documents"]
    assert rows["tuned-whole"]["setup"] == "tuned, whole documents cut at 128 tokens"
    best = max(rows.values(), key=lambda row: row["ndcg@10"])
    assert section["best"]["ndcg@10"] == best["ndcg@10"]
    assert section["best"]["setup"] == rows[section["best"]["id"]]["setup"]
    manifest = json.loads((finished_run.stage_dir("evaluate") / "manifest.json").read_text())
    assert manifest["metrics"]["best_setup"] == section["best"]["setup"]
