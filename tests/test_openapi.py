"""openapi.yaml is generated from the app and checked in: this fails when the two drift."""

from __future__ import annotations

import yaml

from app.openapi import OPENAPI_PATH, openapi_document, render_yaml


def test_openapi_yaml_matches_the_app() -> None:
    generated = openapi_document()
    checked_in = yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))
    assert checked_in == generated, (
        "openapi.yaml is stale: regenerate it with `python -m app.cli openapi --write`"
    )
    # Byte-identical too, so a regenerated file never shows a spurious diff.
    assert OPENAPI_PATH.read_text(encoding="utf-8") == render_yaml(generated)


def test_every_operation_documents_its_errors_in_the_one_shape() -> None:
    document = openapi_document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("description"), (method, path)  # the handler's docstring
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    # The OpenAI-compatible route answers in OpenAI's error shape.
                    shape = "OpenAIError" if path == "/v1/embeddings" else "ErrorBody"
                    assert schema == {"$ref": f"#/components/schemas/{shape}"}, (method, path)
            if path not in ("/healthz", "/readyz"):
                assert "401" in operation["responses"], (method, path)
