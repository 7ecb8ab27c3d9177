"""Command line: `python -m ml_core run|stage|provision|add|models`.

python -m ml_core provision [--store DIR] [NAME ...]
python -m ml_core add NAME --role teacher|student|generator --from PATH [--store DIR] [...]
python -m ml_core run --corpus PATH --out DIR [--config FILE] [--preset quick]
                      [--queries Q.jsonl --qrels QRELS.tsv] [--train-queries LOG.jsonl]
python -m ml_core stage NAME --corpus PATH --out DIR [...]   # one stage on earlier outputs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ml_core.config import PRESETS, load_config
from ml_core.pipeline import STAGES, StageContext, StageError, read_manifest, run_stage
from ml_core.report import report_lines


def default_model_store() -> Path:
    """TAILOR_MODEL_STORE, else var/models beside the package."""
    env = os.environ.get("TAILOR_MODEL_STORE")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "var" / "models"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml_core",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    prov = sub.add_parser("provision", help="put the default model weights into the model store")
    prov.add_argument("names", nargs="*", help="models to provision (default: all but those "
                      "installed on request, e.g. gemma3-270m)")
    prov.add_argument("--store", type=Path, default=None)

    add = sub.add_parser(
        "add", help="add a model of your own (a Hugging Face folder, an ONNX graph with its "
        "tokenizer, or a GGUF generator) to the model store, checked")
    add.add_argument("name", help="its name in the store and in job specs")
    add.add_argument("--role", required=True, choices=("teacher", "student", "generator"))
    add.add_argument("--from", dest="source", type=Path, required=True,
                     help="the model's folder, or its .onnx / .gguf file")
    add.add_argument("--scoring", choices=("cross_encoder", "late_interaction"), default=None,
                     help="teachers: how it scores a pair (default cross_encoder)")
    add.add_argument("--pooling", choices=("mean", "cls"), default=None,
                     help="students: required unless its sentence-transformers files say")
    add.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                     help="students: L2-normalise vectors (default: as its files say)")
    add.add_argument("--query-prefix", default=None, help="students: text put before queries")
    add.add_argument("--passage-prefix", default=None, help="students: text put before passages")
    add.add_argument("--max-query-length", type=int, default=None, help="tokens")
    add.add_argument("--max-passage-length", type=int, default=None, help="tokens")
    add.add_argument("--licence", default="", help="the weights' licence, shown to customers")
    add.add_argument("--source-note", default="", help="where the weights came from")
    add.add_argument("--replace", action="store_true", help="overwrite a model of that name")
    add.add_argument("--store", type=Path, default=None)

    models = sub.add_parser("models", help="list the models in the model store")
    models.add_argument("--store", type=Path, default=None)

    for name in ("run", "stage"):
        cmd = sub.add_parser(name, help="run every stage" if name == "run" else "run one stage")
        if name == "stage":
            cmd.add_argument("stage", choices=STAGES)
        cmd.add_argument("--corpus", type=Path, required=True, help="BEIR corpus.jsonl[.gz]")
        cmd.add_argument("--out", type=Path, required=True, help="working folder for all stages")
        cmd.add_argument("--config", type=Path, default=None, help="YAML/JSON recipe overrides")
        cmd.add_argument("--preset", default="default", choices=sorted(PRESETS))
        cmd.add_argument("--queries", type=Path, default=None, help="judged queries (BEIR jsonl)")
        cmd.add_argument("--qrels", type=Path, default=None, help="judgements (BEIR qrels tsv)")
        cmd.add_argument("--train-queries", type=Path, default=None,
                         help="your users' own queries, unjudged (BEIR jsonl, e.g. from a search "
                         "log): trained on beside the synthetic ones")
        cmd.add_argument("--store", type=Path, default=None, help="model store folder")
    return parser


def _progress_bar(stage: str):  # noqa: ANN202 - returns a ProgressFn bound to a tqdm bar
    from tqdm import tqdm

    bar = tqdm(
        total=1000,
        desc=f"{stage:<9}",
        unit="‰",
        leave=True,
        dynamic_ncols=True,
        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} {postfix}",
    )

    def report(fraction: float, message: str) -> None:
        target = int(max(0.0, min(1.0, fraction)) * 1000)
        if target > bar.n:
            bar.update(target - bar.n)
        bar.set_postfix_str(message[:60], refresh=True)
        if fraction >= 1.0:
            bar.close()

    return report


def print_summary(workdir: Path) -> None:
    """Print the base-vs-tuned table from the evaluate stage's report."""
    report_path = workdir / "evaluate" / "report.json"
    if not report_path.exists():
        return
    print()
    for line in report_lines(json.loads(report_path.read_text())):
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from ml_core.registry import ModelRegistry

    store = args.store or default_model_store()
    if args.command == "provision":
        from ml_core.registry import provision

        provision(store, args.names or None)
        return 0
    if args.command == "add":
        return _add(args, store)
    if args.command == "models":
        for spec in ModelRegistry(store).list():
            print(f"{spec.name:<24} {spec.role:<10} {spec.format:<5} {spec.licence}")
        return 0

    if (args.queries is None) != (args.qrels is None):
        print("error: --queries and --qrels go together", file=sys.stderr)
        return 2
    config = load_config(args.config, args.preset)
    ctx = StageContext(
        workdir=args.out,
        corpus_path=args.corpus,
        config=config,
        registry=ModelRegistry(store),
        eval_queries=args.queries,
        eval_qrels=args.qrels,
        train_queries=args.train_queries,
    )
    stages = STAGES if args.command == "run" else (args.stage,)
    try:
        for stage in stages:
            ctx.progress = _progress_bar(stage)
            result = run_stage(stage, ctx)
            if result.skipped:
                print(
                    f"{stage}: already finished (manifest {ctx.stage_dir(stage) / 'manifest.json'})"
                )
    except (StageError, ValueError, KeyError) as exc:  # CorpusError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if read_manifest(ctx.stage_dir("evaluate")) is not None:
        print_summary(args.out)
    return 0


def _add(args: argparse.Namespace, store: Path) -> int:
    """`add`: copy, check and store one model; prints its spec and check as JSON."""
    from ml_core.model_import import ModelImportError, ModelOptions, add_model

    options = ModelOptions(
        scoring=args.scoring, pooling=args.pooling, normalize=args.normalize,
        query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
        max_query_length=args.max_query_length, max_passage_length=args.max_passage_length,
        licence=args.licence, source=args.source_note,
    )
    try:
        added = add_model(args.source, args.name, args.role, store, options, replace=args.replace)
    except ModelImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    spec = added.spec
    print(json.dumps({"name": spec.name, "role": spec.role, "format": spec.format,
                      "scoring": spec.scoring if spec.role == "teacher" else None,
                      "folder": str(spec.folder), "files": len(spec.sha256),
                      "check": added.check}))
    ordered, total = added.check.get("ordered"), added.check.get("check_queries")
    if ordered is not None and ordered < total:
        print(f"warning: {spec.name} scored the relevant passage higher for {ordered} of "
              f"{total} check queries; a strong {spec.role} orders all of them (is it trained, "
              "and is its pooling or logit the right one?)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
