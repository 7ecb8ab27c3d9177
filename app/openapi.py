"""The checked-in OpenAPI document: generated from the app, compared by tests/test_openapi.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from app.settings import REPO_ROOT

OPENAPI_PATH = REPO_ROOT / "openapi.yaml"


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document as plain JSON data (independent of local settings)."""
    from app.main import create_app
    from app.settings import Settings

    # Fixed settings: the document must not depend on the machine that generates it.
    app = create_app(Settings(database_url="sqlite://", object_store_url="file:///nonexistent"))
    return json.loads(json.dumps(app.openapi()))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so descriptions stay readable in diffs."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_yaml(document: dict[str, Any]) -> str:
    """Stable YAML text for the document (keys in the app's order, unicode kept)."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def write_openapi(path: Path = OPENAPI_PATH) -> Path:
    """Regenerate openapi.yaml."""
    path.write_text(render_yaml(openapi_document()), encoding="utf-8")
    return path
