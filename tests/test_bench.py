"""bench.quality's merge of per-dataset runs into one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality import main, merge_results


def _run(name: str, base: float, tuned: float, threads: str) -> dict:
    rows = {"base": {"ndcg@10": base, "recall@100": 0.9},
            "infonce-e8": {"ndcg@10": tuned, "recall@100": 0.91}}
    return {"preset": "default", "torch_threads": threads,
            "datasets": {name: {"rows": rows, "seconds": {"infonce-e8": {"distill": 10.0}}}}}


def test_merge_keeps_each_dataset_and_each_runs_settings(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_run("cranfield", 0.38, 0.39, "1")))
    second.write_text(json.dumps(_run("scifact-dev", 0.69, 0.71, "2")))
    out = tmp_path / "merged.json"
    assert main(["--merge", str(first), str(second), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["datasets"]) == ["cranfield", "scifact-dev"]
    assert merged["datasets"]["scifact-dev"]["rows"]["infonce-e8"]["ndcg@10"] == 0.71
    assert [run["torch_threads"] for run in merged["runs"]] == ["1", "2"]
    printed = capsys.readouterr().out
    assert "+0.0200" in printed and "+0.0100" in printed


def test_merge_refuses_a_variant_measured_twice():
    with pytest.raises(SystemExit, match="'cranfield' infonce-e8 appears in more than one"):
        merge_results([_run("cranfield", 0.38, 0.39, "1"), _run("cranfield", 0.38, 0.4, "1")])


def test_merge_joins_variants_of_one_dataset_run_in_parallel():
    other = _run("cranfield", 0.38, 0.41, "1")
    other["datasets"]["cranfield"]["rows"]["l16-e8"] = (
        other["datasets"]["cranfield"]["rows"].pop("infonce-e8"))
    other["datasets"]["cranfield"]["seconds"] = {"l16-e8": {"distill": 2.0}}
    merged = merge_results([_run("cranfield", 0.38, 0.39, "1"), other])
    result = merged["datasets"]["cranfield"]
    assert {row: v["ndcg@10"] for row, v in result["rows"].items()} == {
        "base": 0.38, "infonce-e8": 0.39, "l16-e8": 0.41}
    assert result["seconds"] == {"infonce-e8": {"distill": 10.0}, "l16-e8": {"distill": 2.0}}
    other["datasets"]["cranfield"]["rows"]["base"]["ndcg@10"] = 0.37
    with pytest.raises(SystemExit, match="disagree on the base row"):
        merge_results([_run("cranfield", 0.38, 0.39, "1"), other])


def test_variants_reuse_the_shared_stages_they_agree_on(tmp_path, capsys, model_store, monkeypatch):
    """infonce-e8 reuses the default's prepare/generate/filter; a variant with other candidate
    settings re-filters only; one that differs only in the averaging with the base reuses the
    training and only re-exports."""
    from bench import quality
    from ml_core.registry import ModelRegistry
    from tests.test_pipeline import DEMO, TINY_RECIPE

    data = tmp_path / "data" / "cranfield"
    (data / "qrels").mkdir(parents=True)
    corpus_lines = (DEMO / "corpus.jsonl").read_text().splitlines()[:60]
    (data / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    ids = [json.loads(line)["_id"] for line in corpus_lines[:3]]
    (data / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"flow over a wing {i}"}) + "\n"
                for i in range(3))
    )
    (data / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{d}\t1\n" for i, d in enumerate(ids))
    )
    default = quality.VARIANTS[quality.DEFAULT_VARIANT]
    monkeypatch.setitem(quality.VARIANTS, "as-trained", {
        **default, "training": {**default["training"], "base_merge": 0.0}})
    recipe = {**TINY_RECIPE, "generation": {**TINY_RECIPE["generation"], "passages": 12}}
    # The variants pin the default's lists and epoch cap; a short patience keeps the test fast.
    recipe["candidates"] = {k: v for k, v in recipe["candidates"].items() if k != "top_k"}
    recipe["training"] = {**{k: v for k, v in recipe["training"].items()
                             if k not in ("list_size", "max_epochs")}, "patience": 1}
    monkeypatch.setattr(quality, "DATASETS_ROOT", tmp_path / "data")
    variants = [quality.DEFAULT_VARIANT, "infonce-e8", "ce-e8", "as-trained"]
    saved: list[list[str]] = []
    result = quality.run_dataset(
        "cranfield", "default", variants, tmp_path / "work",
        ModelRegistry(model_store), recipe, lambda so_far: saved.append(list(so_far["rows"])),
    )
    # The result so far is handed over after every variant (a stopped run keeps those rows).
    assert [[v for v in variants if v in rows] for rows in saved] == [
        variants[:n] for n in range(1, 5)]
    printed = capsys.readouterr().out
    blocks = {block.split()[0]: block for block in printed.split("[cranfield] ")[1:]}
    reused = {variant: {line.split()[0] for line in block.splitlines()[1:] if "(reused)" in line}
              for variant, block in blocks.items()}
    assert reused == {quality.DEFAULT_VARIANT: set(),
                      "infonce-e8": {"prepare", "generate", "filter"},
                      "ce-e8": {"prepare", "generate"},
                      "as-trained": {"prepare", "generate", "filter"}}
    assert set(result["rows"]) >= {"base", *variants}
    assert blocks["as-trained"].startswith(f"as-trained (training of {quality.DEFAULT_VARIANT})")
    row = result["rows"]["as-trained"]
    assert (row["training_of"], row["base_merge"]) == (quality.DEFAULT_VARIANT, 0.0)
    # Every row carries its per-query nDCG@10 (pairwise comparisons) and its gain's interval.
    assert set(row["per_query"]) == {"q0", "q1", "q2"}
    assert row["significance"]["queries"] == 3
    assert set(result["rows"]["base"]["per_query"]) == {"q0", "q1", "q2"}
    assert "training_of" not in result["rows"]["infonce-e8"]
    work = tmp_path / "work" / "cranfield"
    history = json.loads((work / "as-trained" / "distill" / "history.json").read_text())
    trained = json.loads((work / quality.DEFAULT_VARIANT / "distill" / "history.json").read_text())
    assert history["epochs"] == trained["epochs"]
    # Not trained again: the copied training state (copytree keeps mtimes) was never rewritten.
    state = Path("distill") / "state" / "checkpoint.pt"
    assert (work / "as-trained" / state).stat().st_mtime == (
        work / quality.DEFAULT_VARIANT / state).stat().st_mtime
    # Each variant keeps its report's set-up rows with their per-query nDCG@10; the table
    # pairs each tuned model's hybrid with BM25 against the base's, and the variants' hybrids.
    for variant in variants:
        report = json.loads((work / variant / "evaluate" / "report.json").read_text())
        setups = result["rows"][variant]["setups"]
        assert set(setups) == {r["id"] for r in report["retrievers"]["rows"]}
        for row in setups.values():
            assert set(row["per_query"]) == {"q0", "q1", "q2"}
            assert sum(row["per_query"].values()) / 3 == pytest.approx(row["ndcg@10"])
    tuned = [v for v in variants if quality.HYBRID["tuned"] in result["rows"][v]["setups"]]
    assert quality.DEFAULT_VARIANT in tuned and "ce-e8" in tuned
    results = {"datasets": {"cranfield": result}}
    quality.add_comparisons(results)
    hybrid = result["setup_comparisons"]
    rows = result["rows"]
    for variant in tuned:
        setups = rows[variant]["setups"]
        assert hybrid[f"{variant}: tuned+BM25 - base+BM25"]["difference"] == pytest.approx(
            setups[quality.HYBRID["tuned"]]["ndcg@10"] - setups[quality.HYBRID["base"]]["ndcg@10"])
    versus = hybrid[f"{quality.DEFAULT_VARIANT} - ce-e8 (tuned+BM25)"]
    assert versus["difference"] == pytest.approx(
        rows[quality.DEFAULT_VARIANT]["setups"][quality.HYBRID["tuned"]]["ndcg@10"]
        - rows["ce-e8"]["setups"][quality.HYBRID["tuned"]]["ndcg@10"])
    quality.print_table(results)
    assert "hybrid with BM25 (RRF, chunks), nDCG@10: base" in capsys.readouterr().out


def test_the_bench_default_is_the_product_default_and_infonce_differs_only_in_its_loss():
    """The baseline `make bench` runs: the default's queries, lists and epoch budget, with only
    the loss (and no averaging with the base, as other tools ship it) changed."""
    from bench.quality import DEFAULT_VARIANT, _config, _training_run_hash
    from ml_core.config import build_config

    default = _config("default", DEFAULT_VARIANT, {})
    assert default == build_config("default", {})
    plain = _config("default", "infonce-e8", {})
    assert (plain.training.loss, plain.training.base_merge) == ("infonce", 0.0)
    swapped = {"training": {"loss", "base_merge"}}
    assert plain.model_dump(exclude=swapped) == default.model_dump(exclude=swapped)
    assert _training_run_hash(plain) != _training_run_hash(default)


def test_set_overrides_reach_sections_and_the_seed():
    """A replication under another seed is `--set seed=1`; section settings keep working."""
    from bench.quality import DEFAULT_VARIANT, _config, parse_overrides

    overrides = parse_overrides(["seed=1", "training.patience=3"])
    assert overrides == {"seed": 1, "training": {"patience": 3}}
    config = _config("default", DEFAULT_VARIANT, overrides)
    assert (config.seed, config.training.max_epochs, config.training.patience) == (1, 8, 3)
    # A setting the variant pins is refused, not silently overridden either way.
    with pytest.raises(ValueError,
                       match=f"training.max_epochs conflicts with variant '{DEFAULT_VARIANT}'"):
        _config("default", DEFAULT_VARIANT, parse_overrides(["training.max_epochs=4"]))
    assert _config("default", DEFAULT_VARIANT, parse_overrides(["training.max_epochs=8"]))
    # A lever the variant does not pin is measured as an override of it.
    helped = _config("default", DEFAULT_VARIANT,
                     parse_overrides(['candidates.helpers=["bge-small"]']))
    assert helped.candidates.helpers == ["bge-small"]
    for bad in ("seed", "generation.backend=openai"):  # no value; a string not in JSON quotes
        with pytest.raises(ValueError, match=f"--set '{bad}'"):
            parse_overrides([bad])


def test_a_variant_pinning_a_top_level_setting_refuses_a_contradicting_set(monkeypatch):
    """A variant may pin a top-level setting (the generator); a --set that contradicts it is
    refused rather than silently measuring something else."""
    from bench import quality
    from ml_core.pipeline import section_hash

    monkeypatch.setitem(quality.VARIANTS, "other-generator",
                        {**quality.VARIANTS["l16-e8"], "generator": "gemma3-270m"})
    default, other = (quality._config("default", v, {}) for v in ("l16-e8", "other-generator"))
    assert (default.generator, other.generator) == ("smollm2-135m", "gemma3-270m")
    assert other.model_dump(exclude={"generator"}) == default.model_dump(exclude={"generator"})
    assert section_hash(other, "prepare") == section_hash(default, "prepare")
    assert section_hash(other, "generate") != section_hash(default, "generate")
    with pytest.raises(ValueError, match="generator conflicts with variant 'other-generator'"):
        quality._config("default", "other-generator", {"generator": "smollm2-135m"})
    assert quality._config("default", "other-generator", {"generator": "gemma3-270m"}) == other


def test_merged_runs_compare_the_default_with_each_variant_pairwise(tmp_path, capsys):
    from bench.quality import DEFAULT_VARIANT

    default = _run("cranfield", 0.38, 0.0, "1")
    rows = default["datasets"]["cranfield"]["rows"]
    rows[DEFAULT_VARIANT] = {"ndcg@10": 0.42, "per_query": {"a": 0.5, "b": 0.5, "c": 0.26}}
    del rows["infonce-e8"]
    default["datasets"]["cranfield"]["seconds"] = {DEFAULT_VARIANT: {"distill": 2.0}}
    other = _run("cranfield", 0.38, 0.0, "1")
    rows = other["datasets"]["cranfield"]["rows"]
    rows["infonce-e8"] = {"ndcg@10": 0.41, "per_query": {"a": 0.4, "b": 0.4, "c": 0.43}}
    first, second, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    first.write_text(json.dumps(default))
    second.write_text(json.dumps(other))
    assert main(["--merge", str(first), str(second), "--out", str(out)]) == 0
    comparisons = json.loads(out.read_text())["datasets"]["cranfield"]["comparisons"]
    result = comparisons[f"{DEFAULT_VARIANT} - infonce-e8"]
    assert result["difference"] == pytest.approx(0.01)
    assert (result["better"], result["worse"], result["queries"]) == (2, 1, 3)
    # A run from before per-query scores still joins one that has them.
    older = _run("cranfield", 0.38, 0.40, "1")
    older["datasets"]["cranfield"]["rows"]["p240"] = (
        older["datasets"]["cranfield"]["rows"].pop("infonce-e8"))
    default["datasets"]["cranfield"]["rows"]["base"]["per_query"] = {"a": 0.4}
    joined = merge_results([older, default])["datasets"]["cranfield"]["rows"]
    assert joined["base"]["per_query"] == {"a": 0.4} and "p240" in joined
    assert f"{DEFAULT_VARIANT} - infonce-e8: +0.0100 nDCG@10" in capsys.readouterr().out


def test_merge_compares_retired_variants_its_files_hold(tmp_path, capsys):
    """--compare A B adds A - B where both were measured, including variants retired from
    VARIANTS that an older result file holds; a name in no file and no variant is an error."""
    run = _run("cranfield", 0.38, 0.0, "1")
    rows = run["datasets"]["cranfield"]["rows"]
    del rows["infonce-e8"]
    rows["p240"] = {"ndcg@10": 0.45, "per_query": {"a": 0.6, "b": 0.5, "c": 0.25}}
    rows["p240-infonce"] = {"ndcg@10": 0.40, "per_query": {"a": 0.4, "b": 0.5, "c": 0.30}}
    run["datasets"]["cranfield"]["seconds"] = {"p240": {"distill": 2.0}}
    first, out = tmp_path / "a.json", tmp_path / "m.json"
    first.write_text(json.dumps(run))
    assert main(["--merge", str(first), "--out", str(out), "--compare", "p240", "p240-infonce",
                 "--compare", "infonce-e8", "p240"]) == 0
    comparisons = json.loads(out.read_text())["datasets"]["cranfield"]["comparisons"]
    assert list(comparisons) == ["p240 - p240-infonce"]  # infonce-e8 was not measured here
    assert comparisons["p240 - p240-infonce"]["difference"] == pytest.approx(0.05)
    assert (comparisons["p240 - p240-infonce"]["better"],
            comparisons["p240 - p240-infonce"]["worse"]) == (1, 1)
    printed = capsys.readouterr().out
    assert "p240 - p240-infonce: +0.0500 nDCG@10" in printed
    assert "\np240-infonce " in printed and "\np240 " in printed  # their rows are printed too
    with pytest.raises(SystemExit):
        main(["--merge", str(first), "--out", str(out), "--compare", "p240", "nope"])
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err


def test_the_table_says_which_side_of_a_shared_training_was_averaged(capsys):
    """A variant that reuses another's training records its own averaging share: the note
    under the table must not call both sides averaged (and says nothing where a file from
    before the share was recorded does not know it)."""
    from bench.quality import print_table

    rows = {"base": {"ndcg@10": 0.38},
            "l16-e8": {"ndcg@10": 0.39},
            "as-trained": {"ndcg@10": 0.37, "training_of": "l16-e8", "base_merge": 0.0},
            "merged": {"ndcg@10": 0.40, "training_of": "fused", "base_merge": 0.5},
            "older": {"ndcg@10": 0.40, "training_of": "fused"}}
    print_table({"datasets": {"cranfield": {"rows": rows, "seconds": {}}}})
    out = capsys.readouterr().out
    assert "as-trained: reuses the training of l16-e8; its checkpoint as trained" in out
    assert "merged: reuses the training of fused; its checkpoint averaged with the base (0.5)" \
        in out
    assert "  older: reuses the training of fused\n" in out


def test_encode_bench_times_both_formats_and_scores_the_whole_corpus(tmp_path, registry):
    from bench.encode import run
    from ml_core.config import build_config

    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
    config = build_config("default", {"student": "tiny-student"})
    sampled = run(demo, demo / "qrels" / "test.tsv", 50, 1, tmp_path / "a", registry, config)
    assert sampled["chunks"] == 50 and "ndcg@10" not in sampled
    assert len(sampled["seconds"]["fp32"]) == len(sampled["seconds"]["bf16"]) == 1
    assert 0.999 < sampled["cosine_min"] <= sampled["cosine_mean"] < 1.0 + 1e-6
    whole = run(demo, demo / "qrels" / "test.tsv", 0, 1, tmp_path / "b", registry, config)
    assert whole["chunks"] == whole["corpus_chunks"] > 50
    assert set(whole["ndcg@10"]) == {"fp32", "bf16"}
    assert abs(whole["ndcg@10"]["fp32"] - whole["ndcg@10"]["bf16"]) < 0.05


def test_setups_bench_prints_the_reports_rows_for_the_base_model(tmp_path, registry, capsys):
    from bench.setups import print_table, run
    from ml_core.config import build_config

    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
    # A BEIR folder of the first 300 documents (queries judged elsewhere only miss).
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    lines = (demo / "corpus.jsonl").read_text().splitlines(keepends=True)[:300]
    (data / "corpus.jsonl").write_text("".join(lines))
    (data / "queries.jsonl").write_text((demo / "queries.jsonl").read_text())
    (data / "qrels" / "test.tsv").write_text((demo / "qrels" / "test.tsv").read_text())
    config = build_config("default", {"student": "tiny-student"})
    result = run(data, data / "qrels" / "test.tsv", tmp_path / "work", registry, config)
    ids = [row["id"] for row in result["rows"]]
    assert ids == ["bm25", "base-whole", "base-chunks", "base+bm25-whole", "base+bm25-chunks"]
    assert result["queries"] > 20 and result["documents"] <= 300
    assert result["encoded_documents"] == result["chunked_documents"] > 0
    print_table("cranfield-300", result)
    out = capsys.readouterr().out
    assert f"best set-up: {result['best']['setup']}" in out
    # A random-weight student is no match for BM25 on Cranfield's judgements.
    assert result["best"]["id"] != "base-chunks"


def test_setups_bench_reuses_stored_chunk_vectors_only_when_they_re_encode_the_same(
        tmp_path, registry):
    import numpy as np

    from bench.setups import _cached_vectors
    from ml_core.records import Passage
    from ml_core.student import Student

    student = Student.load(registry.path("tiny-student"))
    student.encode_precision = "fp32"
    passages = [Passage(id=f"p{i}", text=f"river flow number {i} over a plate") for i in range(8)]
    path = tmp_path / "vectors.npy"
    assert _cached_vectors(student, passages, path) is None  # nothing stored yet
    vectors = student.encode_passages(passages)
    np.save(path, vectors)
    assert np.array_equal(_cached_vectors(student, passages, path), vectors)
    np.save(path, vectors[::-1])  # another order: not these chunks' vectors
    with pytest.raises(ValueError, match="re-encoded chunks differ"):
        _cached_vectors(student, passages, path)
    np.save(path, vectors[:4])
    with pytest.raises(ValueError, match="for 8 chunks"):
        _cached_vectors(student, passages, path)


@pytest.mark.parametrize("compare", ["precision", "sampler"])
def test_generate_bench_times_both_generators_on_the_same_sample(tmp_path, registry, compare):
    from bench.generate import COMPARISONS, print_table, run
    from ml_core.config import build_config

    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
    config = build_config("default", {
        "generator": "tiny-generator", "student": "tiny-student",
        "generation": {"query_types": ["questions", "keywords"], "max_new_tokens": 6,
                       "few_shot_examples": 1, "batch_size": 4},
    })
    result = run(demo, 3, 2, tmp_path / "work", registry, config, compare=compare)
    arms = COMPARISONS[compare]
    assert result["arms"] == list(arms) and result["compare"] == compare
    assert result["passages"] == 3 and result["requested"] == 6
    assert result["query_types"] == ["questions", "keywords"]
    assert all(len(result["seconds"][name]) == 2 for name in arms)
    assert all(0 <= result["queries"][name] <= 6 for name in arms)
    assert 0 <= result["identical"] <= result["queries"][arms[0]]
    best = {name: min(result["seconds"][name]) for name in arms}
    assert result["speedup"] == pytest.approx(best[arms[0]] / best[arms[1]])
    print_table("demo", result)


def test_the_sampler_bench_sets_the_inverse_cdf_sampler_against_the_products_sampling(registry):
    from bench.generate import InverseCdfGenerator, InverseCdfSampler
    from ml_core.generation import TransformersGenerator

    plain = TransformersGenerator.load(registry.get("tiny-generator"), device="cpu",
                                       precision="fp32")
    candidate = InverseCdfGenerator(plain.model, plain.tokenizer, "cpu")
    assert plain.sampling(0.7) == {"do_sample": True, "temperature": 0.7, "top_p": 1.0,
                                   "top_k": 0}
    (processor,) = candidate.sampling(0.7)["logits_processor"]
    assert isinstance(processor, InverseCdfSampler) and processor.temperature == 0.7
    assert plain.sampling(0.0) == candidate.sampling(0.0) == {"do_sample": False}
    conversations = [[{"role": "user", "content": "Passage: the wing"}]]
    first = candidate.complete(conversations, temperature=0.8, max_new_tokens=6, seed=3)
    assert first == candidate.complete(conversations, temperature=0.8, max_new_tokens=6, seed=3)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_inverse_cdf_sampler_draws_from_the_tempered_softmax(temperature: float) -> None:
    import torch

    from bench.generate import InverseCdfSampler

    scores = torch.tensor([2.0, 1.0, 0.0, float("-inf"), 0.5, -1.0])
    rows = 40_000
    torch.manual_seed(0)
    picked = InverseCdfSampler(temperature)(None, scores.repeat(rows, 1))
    # One token per row: 0 there, -inf everywhere else, so greedy decoding takes the draw.
    assert torch.equal((picked == 0).sum(dim=1), torch.ones(rows, dtype=torch.long))
    assert torch.isinf(picked).sum() == rows * (len(scores) - 1)
    counts = torch.bincount(picked.argmax(dim=1), minlength=len(scores)).double()
    expected = torch.softmax(scores.double() / temperature, dim=0) * rows
    assert counts[3] == 0  # probability 0: never drawn
    # Each count within 5 standard deviations of its binomial expectation.
    spread = (expected * (1 - expected / rows)).sqrt()
    assert torch.all((counts - expected).abs() <= 5 * spread + 1e-9), (counts, expected)


def test_inverse_cdf_sampler_is_seeded_and_refuses_temperature_zero() -> None:
    import torch

    from bench.generate import InverseCdfSampler

    scores = torch.randn(64, 1000)
    sampler = InverseCdfSampler(0.8)
    torch.manual_seed(7)
    first = sampler(None, scores).argmax(dim=1)
    torch.manual_seed(7)
    assert torch.equal(first, sampler(None, scores).argmax(dim=1))
    assert len(set(first.tolist())) > 10  # a draw, not the argmax of every row
    with pytest.raises(ValueError, match="temperature"):
        InverseCdfSampler(0.0)


def test_train_bench_runs_one_epoch_in_both_formats_on_the_same_lists(tmp_path, registry, capsys):
    from bench.train import print_table, run
    from ml_core.config import build_config

    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
    config = build_config("default", {
        "student": "tiny-student",
        "training": {"batch_size": 8, "micro_batch_size": 4, "list_size": 4,
                     "learning_rate": 1e-3},
    })
    result = run(demo, 16, 1, tmp_path / "work", registry, config)
    assert result["queries"] == 16 and result["steps"] == 2  # one epoch of 16 lists in 8s
    assert all(len(result["dev_loss"][name]) == 2 for name in ("fp32", "bf16"))
    assert result["fp32_weights_moved"] > 0
    # The same lists and seed: bf16's rounding makes it land elsewhere (Adam's first steps move
    # every weight by about the learning rate, so not necessarily by less than fp32 moved) ...
    assert 0 < result["bf16_from_fp32"] < 2 * result["fp32_weights_moved"]
    # ... and both formats start from the same dev loss (to bf16's rounding) and lower it.
    (fp32_before, fp32_after), (bf16_before, bf16_after) = result["dev_loss"].values()
    assert bf16_before == pytest.approx(fp32_before, rel=0.02)
    assert fp32_after < fp32_before and bf16_after < bf16_before
    best = {name: min(result["seconds"][name]) for name in ("fp32", "bf16")}
    assert result["speedup_bf16"] == pytest.approx(best["fp32"] / best["bf16"])
    print_table("demo", result)
    assert "bf16 speed-up" in capsys.readouterr().out
    with pytest.raises(ValueError, match="lists"):
        run(demo, 10_000, 1, tmp_path / "big", registry, config)


def test_teacher_signal_bench_orders_both_candidate_lists_by_every_signal(tmp_path, registry,
                                                                          capsys):
    from bench.teacher_signal import REFERENCE, print_table, run
    from ml_core.config import build_config
    from ml_core.corpus import read_qrels, read_queries
    from ml_core.evaluation import evaluate_retriever
    from ml_core.pipeline import StageContext, load_passages
    from ml_core.student import Student

    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
    config = build_config("default", {"student": "tiny-student", "teacher": "tiny-teacher",
                                      "encode_precision": "fp32", "candidates": {"top_k": 6}})
    qrels_path = demo / "qrels" / "test.tsv"
    qrels = read_qrels(qrels_path)
    judged = [q for q in read_queries(demo / "queries.jsonl") if q.id in qrels]
    work = tmp_path / "work"
    # The student as its own helper: a third vote for its list, so the fused lists differ.
    result = run(demo, qrels_path, ["tiny-student"], work, registry, config)
    assert result["queries"] == len(judged) and result["top_k"] == 6
    assert 0 < result["pairs_scored"] <= len(judged) * 12 and 0 < result["list_overlap"] <= 1
    signals = [f"{s}{suffix}" for suffix in ("", "+helpers")
               for s in ("rrf", "cross_encoder", "fused")]
    assert list(result["systems"]) == ["student", *signals]
    for name, row in result["systems"].items():
        assert 0 <= row["ndcg@10"] <= 1 and row["queries"] == len(judged)
        assert ("vs_" + REFERENCE in row) == (name != REFERENCE)
    # The student row is the student's own retrieval, as the evaluate stage measures it.
    passages = load_passages(StageContext(work, demo / "corpus.jsonl", config, registry))
    student = Student.load(registry.path("tiny-student"))
    own = evaluate_retriever(student, passages, judged, qrels)
    assert result["systems"]["student"]["ndcg@10"] == pytest.approx(own["ndcg@10"], abs=1e-9)
    # The hybrid column: the student's row fused with BM25 is the report's base + BM25 row.
    from ml_core.setups import DenseModel, compare_setups, corpus_documents

    documents = corpus_documents(demo / "corpus.jsonl", passages)
    vectors = student.encode_passages(passages)
    setups = compare_setups([DenseModel("base", student, vectors, 256)], passages, documents,
                            judged, qrels, 128, 0)
    base_hybrid = next(row for row in setups["rows"] if row["id"] == "base+bm25-chunks")
    rows = result["systems"]
    assert rows["student"]["hybrid"]["ndcg@10"] == pytest.approx(base_hybrid["ndcg@10"],
                                                                 abs=1e-9)
    assert "vs_student" not in rows["student"]["hybrid"]
    fused_hybrid = rows["fused"]["hybrid"]
    assert fused_hybrid["vs_student"]["difference"] == pytest.approx(
        fused_hybrid["ndcg@10"] - base_hybrid["ndcg@10"], abs=1e-9)
    print_table("demo", result)
    out = capsys.readouterr().out
    assert "fused+helpers" in out and "vs student + BM25" in out
    # A seeded sample of the judged queries, on the cached encodings.
    sample = run(demo, qrels_path, [], work, registry, config, max_queries=20)
    assert sample["queries"] == 20 and sample["list_overlap"] == 1.0  # no helper, same lists


def test_teacher_signal_bench_residual_targets_subtract_or_add_bm25(tmp_path, registry):
    """A residual target at weight 0 is its signal; a large weight turns the list toward
    BM25's reverse, a large negative one toward BM25's own order, so the orderings differ
    where BM25 has something to say."""
    from bench.teacher_signal import residual_name, run
    from ml_core.config import build_config

    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
    config = build_config("default", {"student": "tiny-student", "teacher": "tiny-teacher",
                                      "encode_precision": "fp32", "candidates": {"top_k": 6}})
    weights = [0.0, 100.0, -100.0]
    result = run(demo, demo / "qrels" / "test.tsv", [], tmp_path / "work", registry, config,
                 max_queries=30, residual=weights)
    rows = result["systems"]
    assert result["residual"] == weights
    names = [residual_name(s, b) for s in ("fused", "cross_encoder") for b in weights]
    assert list(rows)[-6:] == names == [
        "fused-0bm25", "fused-100bm25", "fused+100bm25",
        "cross_encoder-0bm25", "cross_encoder-100bm25", "cross_encoder+100bm25"]
    for signal in ("fused", "cross_encoder"):
        same, down, up = (rows[residual_name(signal, beta)] for beta in weights)
        assert same["ndcg@10"] == pytest.approx(rows[signal]["ndcg@10"], abs=1e-12)
        assert same["hybrid"]["ndcg@10"] == pytest.approx(rows[signal]["hybrid"]["ndcg@10"],
                                                          abs=1e-12)
        assert down["ndcg@10"] != pytest.approx(rows[signal]["ndcg@10"], abs=1e-6)
        assert up["ndcg@10"] != pytest.approx(down["ndcg@10"], abs=1e-6)


def test_teacher_signal_bench_with_a_late_interaction_co_teacher(tmp_path, registry, capsys):
    """Two teachers: each alone and fused, their average alone and fused, and each one's
    speed on the same pairs; the late-interaction teacher encodes each passage once."""
    from bench.teacher_signal import print_table, run
    from ml_core.config import build_config
    from ml_core.registry import ModelRegistry
    from tests.tiny_colbert import build_tiny_colbert

    spec, _ = build_tiny_colbert(tmp_path / "tiny-colbert")
    both = ModelRegistry(registry.store, extra={"tiny-colbert": spec.folder})
    demo = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
    config = build_config("default", {"student": "tiny-student", "teacher": "tiny-teacher",
                                      "encode_precision": "fp32", "candidates": {"top_k": 6}})
    result = run(demo, demo / "qrels" / "test.tsv", [], tmp_path / "work", both, config,
                 max_queries=24, teacher_names=["tiny-teacher", "tiny-colbert"])
    assert list(result["systems"]) == ["student", "rrf", "cross_encoder", "fused",
                                       "late_interaction", "li_fused", "teachers",
                                       "teachers_fused"]
    rows = result["systems"]
    assert rows["teachers_fused"]["vs_fused"]["queries"] == 24
    assert rows["late_interaction"]["ndcg@10"] != rows["cross_encoder"]["ndcg@10"]
    cross, late = result["speed"]
    assert cross["pairs"] == late["pairs"] == result["pairs_scored"] > 0
    assert cross["pairs_per_s"] > 0 and late["pairs_per_s"] > 0
    # 24 queries x 6 candidates, far fewer distinct passages: each encoded once.
    assert late["distinct_queries"] == 24 and 0 < late["passages_encoded"] < late["pairs"]
    print_table("demo", result)
    out = capsys.readouterr().out
    assert "teachers_fused" in out and "tiny-colbert" in out and "pairs/s" in out


def test_cross_fit_folds_are_seeded_disjoint_and_cover_every_query():
    from bench.cross_fit import cross_fit_folds

    ids = [f"q{i}" for i in range(11)]
    folds = cross_fit_folds(ids, 2, seed=13)
    assert sorted(map(len, folds)) == [5, 6]
    assert sorted(folds[0] + folds[1]) == sorted(ids) and not set(folds[0]) & set(folds[1])
    assert folds == cross_fit_folds(ids, 2, seed=13) != cross_fit_folds(ids, 2, seed=1)


def test_joined_folds_weigh_each_fold_by_its_queries_and_pair_every_query():
    from bench.cross_fit import join_folds
    from bench.quality import _same_row

    def fold(scores: dict[str, tuple[float, float]], recommended: str) -> dict:
        rows = {side: {"ndcg@10": sum(s[n] for s in scores.values()) / len(scores),
                       "queries": len(scores)} for n, side in enumerate(("base", "tuned"))}
        per_query = {q: {"base": b, "tuned": t} for q, (b, t) in scores.items()}
        return {**rows, "per_query": per_query, "recommended": recommended}

    joined = join_folds([fold({"a": (0.2, 0.4), "b": (0.5, 0.5)}, "tuned"),
                         fold({"c": (0.9, 0.6)}, "base")])
    assert joined["base"] == {"ndcg@10": pytest.approx(1.6 / 3), "queries": 3}
    assert joined["tuned"]["ndcg@10"] == pytest.approx(1.5 / 3)
    assert joined["significance"]["queries"] == 3
    assert joined["significance"]["difference"] == pytest.approx(-0.1 / 3)
    assert (joined["significance"]["better"], joined["significance"]["worse"]) == (1, 1)
    assert joined["recommended"] == "tuned/base"
    # A joined base row agrees with one measured whole, up to the order of the sums.
    assert _same_row({"ndcg@10": 0.1 + 0.2, "queries": 3}, {"ndcg@10": 0.3, "queries": 3})
    assert not _same_row({"ndcg@10": 0.3001, "queries": 3}, {"ndcg@10": 0.3, "queries": 3})


def test_the_cross_fitted_variants_are_the_default_on_other_queries():
    """supplied-e8 is the default (l16-e8) without synthetic queries, mixed-e8 the default
    itself: what differs is only the training queries the bench hands them (CROSS_FIT)."""
    from bench.quality import CROSS_FIT, _config

    default, supplied, mixed = (_config("default", v, {})
                                for v in ("l16-e8", "supplied-e8", "mixed-e8"))
    assert mixed == default
    assert supplied.generation.synthetic is False and default.generation.synthetic is True
    assert supplied.model_dump(exclude={"generation": {"synthetic"}}) == default.model_dump(
        exclude={"generation": {"synthetic"}})
    assert set(CROSS_FIT) == {"supplied-e8", "mixed-e8", "oracle-e8", "oracle-raw-e8",
                              "oracle-anchor-e8", "oracle-easy-e8"}
    oracle = _config("default", "oracle-e8", {})
    assert oracle.candidates.teacher_signal == "cross_encoder"
    assert oracle.model_dump(exclude={"candidates": {"teacher_signal"}}) == supplied.model_dump(
        exclude={"candidates": {"teacher_signal"}})
    raw = _config("default", "oracle-raw-e8", {})
    assert raw.training.base_merge == 0.0 and raw.model_dump(
        exclude={"training": {"base_merge"}}) == oracle.model_dump(
        exclude={"training": {"base_merge"}})
    easy = _config("default", "oracle-easy-e8", {})
    assert easy.candidates.easy_k == _config("default", "easy-e8", {}).candidates.easy_k > 0
    assert easy.model_dump(exclude={"candidates": {"easy_k", "easy_depth"}}) == oracle.model_dump(
        exclude={"candidates": {"easy_k", "easy_depth"}})
    pulled = _config("default", "oracle-anchor-e8", {})
    assert pulled.training.base_anchor == _config("default", "anchor-e8", {}).training.base_anchor
    assert pulled.training.base_anchor > 0 and pulled.model_dump(
        exclude={"training": {"base_anchor"}}) == oracle.model_dump(
        exclude={"training": {"base_anchor"}})


def test_the_judgements_scorer_grades_a_pair_by_its_passages_document(tmp_path):
    from bench.oracle import QrelsScorer
    from ml_core.records import Passage, Query, write_jsonl

    passages = [Passage(id="d1#0", parent_id="d1", title="Wings", text="lift on a wing"),
                Passage(id="d1#1", parent_id="d1", title="Wings", text="more on lift"),
                Passage(id="d2", title="", text="heat transfer")]
    write_jsonl(tmp_path / "passages.jsonl", passages)
    scorer = QrelsScorer([Query(id="q1", text="wing lift"), Query(id="q2", text="wing lift"),
                          Query(id="q3", text="heat")],
                         {"q1": {"d1": 2}, "q2": {"d1": 3, "d2": 1}, "q3": {"d2": 1}},
                         tmp_path / "passages.jsonl")
    scores = scorer.score([("wing lift", "Wings lift on a wing"),
                           ("wing lift", "Wings more on lift"), ("wing lift", "heat transfer"),
                           ("heat", "Wings lift on a wing"), ("unjudged", "heat transfer")])
    # A text shared by two judged queries takes the higher grade; unjudged pairs score 0.
    assert scores.tolist() == [3.0, 3.0, 1.0, 0.0, 0.0]
    assert (scorer.pairs_scored, scorer.pairs_judged) == (5, 3)


# Eight topical queries over the demo corpus's first 60 documents: a tiny stand-in for a judged
# development dataset (bench.quality's DATASETS_ROOT layout).
_TOPICS = ["wing flutter", "heat transfer", "shock wave", "boundary layer", "flat plate",
           "supersonic cone", "laminar flow", "turbulent jet"]


def _tiny_dataset(root, grades):
    """root/cranfield with the demo corpus's first 60 documents, the eight _TOPICS as queries
    q0..q7 and qrels from `grades` (a function of (query index, document index, document id)
    to a grade, or None for unjudged); returns the corpus's document ids."""
    from tests.test_pipeline import DEMO

    data = root / "cranfield"
    (data / "qrels").mkdir(parents=True)
    corpus_lines = (DEMO / "corpus.jsonl").read_text().splitlines()[:60]
    (data / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    docs = [json.loads(line)["_id"] for line in corpus_lines]
    (data / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(_TOPICS)))
    rows = [(f"q{i}", d, grades(i, j, d)) for i in range(len(_TOPICS))
            for j, d in enumerate(docs)]
    (data / "qrels" / "test.tsv").write_text(
        "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows if g is not None))
    return docs


def test_a_cross_fitted_variant_never_grades_a_query_its_model_trained_on(
    tmp_path, model_store, monkeypatch
):
    from bench import quality
    from ml_core.registry import ModelRegistry
    from tests.test_pipeline import TINY_RECIPE

    # Query i judges document i, grade 1.
    _tiny_dataset(tmp_path / "data", lambda i, j, doc: 1 if i == j else None)
    monkeypatch.setattr(quality, "DATASETS_ROOT", tmp_path / "data")
    recipe = {**TINY_RECIPE, "training": {k: v for k, v in TINY_RECIPE["training"].items()
                                          if k not in ("list_size", "max_epochs")},
              "candidates": {k: v for k, v in TINY_RECIPE["candidates"].items() if k != "top_k"}}
    result = quality.run_dataset("cranfield", "default", ["supplied-e8"], tmp_path / "work",
                                 ModelRegistry(model_store), recipe)
    work = tmp_path / "work" / "cranfield" / "supplied-e8"
    graded = []
    for f in (0, 1):
        inputs = work / f"fold{f}" / "inputs"
        trained = {json.loads(x)["_id"] for x in (inputs / "train.jsonl").open()}
        report = json.loads((work / f"fold{f}" / "evaluate" / "report.json").read_text())
        assert trained and not trained & set(report["per_query"])
        assert report["judgements"] == "customer"
        graded += list(report["per_query"])
    assert sorted(graded) == [f"q{i}" for i in range(8)]
    rows = result["rows"]
    assert set(rows["supplied-e8"]["per_query"]) == set(rows["base"]["per_query"]) == set(
        f"q{i}" for i in range(8))
    assert rows["supplied-e8"]["significance"]["queries"] == 8
    assert rows["supplied-e8"]["filter"]["generated"] == 8  # each fold's 4 training queries
    assert set(result["seconds"]["supplied-e8"]) == {
        "prepare", "generate", "filter", "distill", "evaluate"}


def test_the_oracle_variant_trains_on_the_other_folds_judgements_only(
    tmp_path, model_store, monkeypatch
):
    import ml_core.teacher
    from bench import quality
    from ml_core.registry import ModelRegistry
    from tests.test_pipeline import TINY_RECIPE

    # Every query judges every other document, graded 1 to 3, so that the candidate lists of
    # the (random) tiny student hold judged and unjudged passages both.
    def graded(i, j, doc):
        return 1 + (i + j) % 3 if (i + j) % 2 == 0 else None

    docs = _tiny_dataset(tmp_path / "data", graded)
    data = tmp_path / "data" / "cranfield"
    grade = {(f"q{i}", d): graded(i, j, d) for i in range(len(_TOPICS))
             for j, d in enumerate(docs) if graded(i, j, d) is not None}
    monkeypatch.setattr(quality, "DATASETS_ROOT", tmp_path / "data")
    original = ml_core.teacher.load_teacher
    recipe = {**TINY_RECIPE, "training": {k: v for k, v in TINY_RECIPE["training"].items()
                                          if k not in ("list_size", "max_epochs")},
              "candidates": {k: v for k, v in TINY_RECIPE["candidates"].items()
                             if k not in ("top_k", "teacher_signal")}}
    result = quality.run_dataset("cranfield", "default", ["oracle-e8"], tmp_path / "work",
                                 ModelRegistry(model_store), recipe)
    assert ml_core.teacher.load_teacher is original  # the judgements are a teacher only inside
    work = tmp_path / "work" / "cranfield" / "oracle-e8"
    document_of = {row["id"]: row.get("parent_id") or row["id"] for row in map(
        json.loads, (work / "fold0" / "prepare" / "passages.jsonl").open())}
    texts = {row["text"]: row["_id"] for row in map(json.loads, (data / "queries.jsonl").open())}
    for f in (0, 1):
        fold = work / f"fold{f}"
        trained = {json.loads(x)["_id"] for x in (fold / "inputs" / "train.jsonl").open()}
        report = json.loads((fold / "evaluate" / "report.json").read_text())
        assert trained and not trained & set(report["per_query"])
        # Every scored pair of the filter carries its judged grade (0 when unjudged), and only
        # the training fold's queries were scored.
        rows = [json.loads(x) for x in (fold / "filter" / "teacher_scores.jsonl").open()]
        queries = {row["id"]: row for row in map(
            json.loads, (fold / "generate" / "queries.jsonl").open())}
        assert rows and {texts[queries[r["query_id"]]["text"]] for r in rows} <= trained
        judged = 0
        for row in rows:
            qid = texts[queries[row["query_id"]]["text"]]
            expected = [grade.get((qid, document_of[pid]), 0) for pid in row["passage_ids"]]
            assert row["raw_scores"] == expected
            judged += sum(1 for g in expected if g)
        assert 0 < judged < sum(len(row["raw_scores"]) for row in rows)
    assert "teacher" not in result["rows"]  # the judgements' own check is no teacher row
    assert result["rows"]["oracle-e8"]["significance"]["queries"] == 8
