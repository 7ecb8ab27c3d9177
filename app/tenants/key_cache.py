"""Verified API keys, kept in this process for a few seconds so a request costs no database
round trip once its key is known.

An entry maps a key's sha256 to what the request needs (tenant, scope, expiry). Only keys that
verified are kept, so a stream of wrong keys cannot fill it. Revoking a key forgets it here at
once; another API process forgets it when its entry's time is up (`api_key_cache_ttl_s`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from app.db.models import KeyScope, Tenant


@dataclass(frozen=True)
class VerifiedKey:
    """A key that verified: its row's id, scope and expiry, and a detached copy of its tenant."""

    key_id: str
    scope: KeyScope
    expires_at: datetime | None
    tenant: Tenant

    @property
    def tenant_id(self) -> str:
        return self.tenant.id


class KeyCache:
    """key hash -> VerifiedKey, least recently used forgotten past `capacity`; thread-safe."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[float, VerifiedKey]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_hash: str, ttl_s: float) -> VerifiedKey | None:
        """The entry for `key_hash` if it was verified less than `ttl_s` seconds ago."""
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None:
                return None
            if time.monotonic() - entry[0] >= ttl_s:
                del self._entries[key_hash]
                return None
            self._entries.move_to_end(key_hash)
            return entry[1]

    def put(self, key_hash: str, verified: VerifiedKey) -> None:
        with self._lock:
            self._entries[key_hash] = (time.monotonic(), verified)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drop the key with row id `key_id` (revoked)."""
        with self._lock:
            for key_hash, (_, verified) in list(self._entries.items()):
                if verified.key_id == key_id:
                    del self._entries[key_hash]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# One per process: the API's requests and the service that revokes keys share it.
KEYS = KeyCache()
