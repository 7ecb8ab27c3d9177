"""Token buckets: per-key request rates and per-address failed-authentication counts.

A bucket holds up to `burst` tokens and refills at `per_second`; a request takes one when at
least one is there. Production keeps buckets in Redis (one Lua script reads, refills, takes and
writes atomically, on Redis's clock, so every API process shares each bucket); the embedded
default keeps them in the process. When Redis cannot be reached, requests are let through and a
warning is logged: a rate limiter must not take the API down with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rate:
    """`per_second` tokens a second, at most `burst` at once."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class Decision:
    """One take from a bucket: whether it was allowed and what the headers say."""

    allowed: bool
    limit: int
    remaining: int
    # Seconds until the bucket is full again, and until one token is there (0 when one is).
    reset_s: float
    retry_after_s: float

    def headers(self) -> dict[str, str]:
        """`X-RateLimit-*` (and `Retry-After` when refused), in whole seconds rounded up."""
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def decide(tokens: float, rate: Rate, allowed: bool) -> Decision:
    """The decision for a bucket left with `tokens` after the take."""
    return Decision(
        allowed=allowed,
        limit=rate.burst,
        remaining=max(0, math.floor(tokens)),
        reset_s=max(0.0, (rate.burst - tokens) / rate.per_second),
        retry_after_s=max(0.0, (1 - tokens) / rate.per_second),
    )


class Limiter(Protocol):
    """Where buckets live."""

    def take(self, key: str, rate: Rate, cost: int = 1) -> Decision:
        """Refill `key`'s bucket, then take `cost` tokens if at least one is there. A `cost` of
        0 asks whether a request would be allowed without spending anything."""


class MemoryLimiter:
    """Buckets in this process (the embedded default: one API process). At most `capacity`
    buckets are kept; the least recently used is forgotten first (it refilled long ago)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, rate: Rate, cost: int = 1) -> Decision:
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.pop(key, (float(rate.burst), now))
            tokens = min(float(rate.burst), tokens + (now - stamp) * rate.per_second)
            allowed = tokens >= 1
            if allowed:
                tokens -= cost
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        return decide(tokens, rate, allowed)


# KEYS[1] the bucket; ARGV: burst, tokens per second, cost. Returns {allowed, tokens as text}
# (Lua numbers would come back truncated to integers). TIME is Redis's clock, so API hosts
# with skewed clocks still share one bucket correctly.
_TAKE = """
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""


class RedisLimiter:
    """Buckets in Redis, shared by every API process (production). Keys: `<prefix>rl:<key>`."""

    def __init__(self, url: str, prefix: str = "tailor:", timeout_s: float = 0.5) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.prefix = prefix
        self._script = self.client.register_script(_TAKE)
        self._warned_at = 0.0

    def take(self, key: str, rate: Rate, cost: int = 1) -> Decision:
        try:
            allowed, tokens = self._script(
                keys=[f"{self.prefix}rl:{key}"], args=[rate.burst, rate.per_second, cost]
            )
        except Exception as exc:  # redis.RedisError, OSError: fail open, say so now and then
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning("rate limiter unavailable, requests are not limited: %s", exc)
            return decide(float(rate.burst), rate, True)
        return decide(float(tokens), rate, bool(allowed))
