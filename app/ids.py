"""Prefixed random identifiers (`job_` + 24 hex chars) and API keys (`tlr_` + 40 url-safe chars)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal

IdPrefix = Literal["ten", "key", "crp", "evs", "job", "mdl", "emb", "whk", "whd", "msg"]

API_KEY_PREFIX = "tlr_"
# Keys are looked up by their first 12 characters (indexed) and then compared by hash.
API_KEY_LOOKUP_CHARS = 12


def new_id(prefix: IdPrefix) -> str:
    """A fresh id such as `job_3f2a...` (96 random bits)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def new_api_key() -> str:
    """A fresh secret API key `tlr_<40 url-safe chars>` (240 random bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(30)


def api_key_lookup_prefix(key: str) -> str:
    """The indexed, non-secret part of a key used to find its row."""
    return key[:API_KEY_LOOKUP_CHARS]


def hash_api_key(key: str) -> str:
    """sha256 hex of the whole key: what the database stores instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()
