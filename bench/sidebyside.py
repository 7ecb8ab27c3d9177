"""The command line shared by the fp32-against-bf16 benchmarks (bench.encode, bench.generate,
bench.train): one dataset, `--repeats` alternations, a work folder, the model store, and a JSON
file that records the machine beside the dataset's result."""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.quality import DATASETS_ROOT, QRELS
from ml_core.__main__ import default_model_store


def parser(doc: str, name: str, repeats: int = 1) -> argparse.ArgumentParser:
    """The shared options; `name` picks the work folder and the results file."""
    parsed = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parsed.add_argument("--dataset", default="scifact-dev", choices=sorted(QRELS))
    parsed.add_argument("--repeats", type=int, default=repeats)
    parsed.add_argument("--work", type=Path, default=Path(f"var/bench-{name}"))
    parsed.add_argument("--store", type=Path, default=default_model_store())
    parsed.add_argument("--out", type=Path, default=Path(f"bench/results/{name}.json"))
    return parsed


def finish(args: argparse.Namespace, result: dict[str, Any],
           print_table: Callable[[str, dict[str, Any]], None]) -> int:
    """Print the table and write {machine, cpus, torch_threads, datasets: {dataset: result}}."""
    print_table(args.dataset, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": os.environ.get("TAILOR_TORCH_THREADS", "all"),
        "datasets": {args.dataset: result},
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


def dataset_folder(args: argparse.Namespace) -> Path:
    return DATASETS_ROOT / args.dataset
