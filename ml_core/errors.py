"""The errors ml_core raises on purpose: bad inputs or settings a user can fix, each carrying the
stable code the service reports it under (`{"error": code, ...}`)."""

from __future__ import annotations

from typing import ClassVar


class MLCoreError(Exception):
    """Base of ml_core's deliberate errors; `code` names the kind for clients."""

    code: ClassVar[str] = "stage_failed"
