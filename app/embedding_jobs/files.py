"""Where a bulk embedding job's files live in the object store (shared by the API, which lists
and serves them, and the worker, which writes them)."""

from __future__ import annotations

import re

# Shard files and the manifest (ml_core.bulk_embed): the only names a download may ask for.
FILE_NAME = re.compile(r"^(manifest\.json|vectors-\d{5}\.npy|ids-\d{5}\.jsonl)$")


def embeddings_prefix(job_id: str) -> str:
    """The folder of a job's shards and manifest."""
    return f"embedding-jobs/{job_id}/"


def embeddings_key(job_id: str, name: str) -> str:
    """The key of one of a job's files (manifest.json, vectors-00000.npy, ids-00000.jsonl)."""
    return embeddings_prefix(job_id) + name
