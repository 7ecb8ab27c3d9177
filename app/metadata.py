"""A resource's `name` and `metadata`, as OpenAI and Stripe shape them: metadata is at most 16
string pairs, keys up to 64 characters, values up to 512. Lists filter on them with
`?name=...` and `?metadata[key]=value` (repeatable; every pair must match).

The pairs are the tenant's own labels (a team, a ticket, a dataset version): ids, never secrets
or corpus text, which the docs ask callers to keep out.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from sqlalchemy import ColumnElement
from starlette.datastructures import QueryParams

from app.errors import InvalidRequest

MAX_PAIRS = 16
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 512
_FILTER = re.compile(r"metadata\[(?P<key>[^\[\]]*)\]")


def check_metadata(pairs: dict[str, str]) -> dict[str, str]:
    """The pairs, or ValueError naming the key that breaks a limit."""
    if len(pairs) > MAX_PAIRS:
        raise ValueError(f"at most {MAX_PAIRS} pairs are allowed, got {len(pairs)}")
    for key, value in pairs.items():
        if not key:
            raise ValueError("a key must not be empty")
        if len(key) > MAX_KEY_CHARS:
            raise ValueError(f"key {key[:MAX_KEY_CHARS]!r}... is longer than {MAX_KEY_CHARS} "
                             f"characters")
        if len(value) > MAX_VALUE_CHARS:
            raise ValueError(f"the value of key {key!r} is longer than {MAX_VALUE_CHARS} "
                             f"characters")
    return pairs


Metadata = Annotated[
    dict[str, Annotated[str, Field(strict=True)]],
    AfterValidator(check_metadata),
    Field(description=f"Up to {MAX_PAIRS} string pairs of your own (keys up to {MAX_KEY_CHARS} "
          f"characters, values up to {MAX_VALUE_CHARS}); filter lists with "
          "`?metadata[key]=value`.", examples=[{"team": "search", "dataset": "v3"}]),
]

Name = Annotated[str, Field(min_length=1, max_length=200, description="Your label for it.")]

# The list routes' filter parameters, as documented in the OpenAPI description (FastAPI cannot
# declare a parameter whose name carries the key).
METADATA_FILTER_PARAMETER: dict[str, Any] = {
    "name": "metadata",
    "in": "query",
    "required": False,
    "style": "deepObject",
    "explode": True,
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    "description": "Only rows whose metadata holds every given pair: "
    "`?metadata[team]=search&metadata[dataset]=v3`.",
}


def metadata_filter(query: QueryParams) -> dict[str, str]:
    """The `metadata[key]=value` pairs of a list request (422 naming a malformed one)."""
    wanted: dict[str, str] = {}
    for name, value in query.multi_items():
        if not name.startswith("metadata"):
            continue
        match = _FILTER.fullmatch(name)
        if match is None or not match["key"] or len(match["key"]) > MAX_KEY_CHARS:
            raise InvalidRequest(
                f"query parameter {name[:80]!r}: filter metadata as metadata[key]=value",
                field=name[:80],
            )
        if match["key"] in wanted and wanted[match["key"]] != value:
            raise InvalidRequest(f"metadata[{match['key']}] is given twice with different "
                                 f"values", field=name)
        wanted[match["key"]] = value
    return wanted


def matches(column: Any, wanted: dict[str, str]) -> list[ColumnElement[bool]]:
    """SQL conditions: the JSON `column` holds every pair of `wanted` (PostgreSQL and SQLite)."""
    return [column[key].as_string() == value for key, value in wanted.items()]
