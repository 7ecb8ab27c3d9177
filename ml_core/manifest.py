"""Stage manifests and fingerprints: when a finished stage can be reused.

A stage is finished when its folder holds `manifest.json` (written last) carrying the fingerprint
the stage would have now: a hash of the recipe settings it reads, the fingerprints of the stages
whose artifacts it consumes, and the sha256 of the job's files it reads. So a rerun or a
redelivered task skips finished stages, and a changed setting reruns exactly the stages
downstream of it. Which stage reads what is wired in `ml_core.pipeline`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_core.config import RecipeConfig
from ml_core.registry import file_sha256

MANIFEST = "manifest.json"
# Written when a stage starts: the fingerprint its partial outputs belong to.
STARTED_FOR = ".fingerprint"

# Settings added after stages had already run, with the value that does what the recipe did
# before them. At that value they are left out of the hash, so a stage that finished before the
# setting existed (a job resumed across an upgrade) keeps its fingerprint and is not redone.
_ADDED_SETTINGS: dict[tuple[str, str], Any] = {
    ("candidates", "helpers"): [],
    ("candidates", "co_teachers"): [],
    ("candidates", "round_trip_scope"): "passage",
    ("generation", "synthetic"): True,
    ("generation", "cheap_passages"): None,
    ("training", "train_layers"): None,
    ("training", "tune"): "both",
    ("candidates", "easy_k"): 0,
    ("candidates", "easy_depth"): 100,
    ("training", "base_anchor"): 0.0,
}


def settings_hash(config: RecipeConfig, settings: Sequence[str]) -> str:
    """sha256 of the named recipe sections or "section.field"s of `config` (a manifest's
    config_hash)."""
    data = config.model_dump(mode="json")
    for (section, key), neutral in _ADDED_SETTINGS.items():
        if data[section].get(key) == neutral:
            del data[section][key]
    picked: dict[str, Any] = {}
    for name in settings:
        section, _, field = name.partition(".")
        if field and field not in data[section]:  # an added setting at its neutral value
            continue
        picked[name] = data[section][field] if field else data[section]
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def fingerprint(
    stage: str,
    config_hash: str,
    upstream: Mapping[str, str],
    files: Mapping[str, Path | None],
) -> str:
    """The hash that decides whether a finished stage can be reused: its settings' hash, the
    fingerprints of the stages it consumes (by name) and the sha256 of each named input file
    (None for a file the job does not have)."""
    parts: dict[str, Any] = {"stage": stage, "config": config_hash, **upstream}
    for name, path in files.items():
        parts[name] = file_sha256(path) if path else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage has not finished."""
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_manifest(stage_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically: its presence marks the stage finished."""
    tmp = stage_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(stage_dir / MANIFEST)
