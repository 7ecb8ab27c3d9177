"""The docker/ files against the code they run (no Docker engine on the CI machines).

These cannot build the images; they catch the drift a build would only show on deploy: a
setting renamed in app/settings.py but not in compose, a module the images start that moved, a
path the Dockerfiles copy that the build context excludes, a queue that does not exist.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from pathlib import Path

import pytest
import yaml

from app.settings import Settings
from worker.celery_app import QUEUES

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
SETTING_ENV = {f"TAILOR_{name.upper()}" for name in Settings.model_fields}


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"\bTAILOR_[A-Z0-9_]+", text))


def test_every_tailor_variable_in_docker_files_is_a_setting() -> None:
    for path in [DOCKER / "compose.yaml", *DOCKERFILES]:
        unknown = _env_names(path.read_text()) - SETTING_ENV
        assert not unknown, f"{path.name}: {sorted(unknown)} are not fields of app.settings"


def test_compose_builds_existing_dockerfiles_and_services_use_built_images() -> None:
    built = {}
    for name, service in COMPOSE["services"].items():
        if "build" in service:
            assert service["build"]["context"] == ".."
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
            built[service["image"]] = name
    for name, service in COMPOSE["services"].items():
        image = service.get("image", "")
        if image.startswith("tailor-"):
            assert image in built, f"{name} uses {image}, which no service builds"


def test_worker_services_consume_real_queues() -> None:
    for name in ("worker-cpu", "worker-gpu", "worker-webhooks"):
        value = COMPOSE["services"][name]["environment"]["WORKER_QUEUES"]
        default = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
        assert set(default.split(",")) <= set(QUEUES), (name, value)
    for path in DOCKERFILES:
        for queues in re.findall(r"WORKER_QUEUES=([a-z,]+)", path.read_text()):
            assert set(queues.split(",")) <= set(QUEUES), path.name


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for ours: the last matching pattern wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, pattern.replace("**/", "")):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_the_context_holds(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [
        line.strip() for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        source
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert "pyproject.toml" in sources and "ml_core" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
        assert not _ignored(source, patterns), f"{dockerfile.name}: {source} is .dockerignored"


def test_what_the_images_start_exists() -> None:
    text = "\n".join(p.read_text() for p in DOCKERFILES)
    assert "uvicorn app.main:app" in text
    assert importlib.import_module("app.main").app is not None
    assert "from app.db.migrate import upgrade" in text
    assert callable(importlib.import_module("app.db.migrate").upgrade)
    assert "celery -A worker.celery_app worker -P prefork" in text
    assert importlib.import_module("worker.celery_app").celery_app is not None
    provision = COMPOSE["services"]["models"]["command"]
    assert provision[:4] == ["python", "-m", "ml_core", "provision"]
    from ml_core.__main__ import _parser

    assert str(_parser().parse_args(provision[3:]).store) == provision[-1]
