"""The one settings object: every component's URL and limit, read from TAILOR_* env / .env."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Defaults are anchored at the repository root so the API, the worker and the CLI agree on the
# embedded set-up whatever directory they are started from.
REPO_ROOT = Path(__file__).resolve().parents[1]
VAR = REPO_ROOT / "var"

MiB = 1024**2
GiB = 1024**3


class Settings(BaseSettings):
    """Configuration for the API, the worker and the CLI (env prefix TAILOR_)."""

    model_config = SettingsConfigDict(
        env_prefix="TAILOR_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Components.
    database_url: str = f"sqlite:///{VAR / 'tailor.db'}"
    # "filesystem://" is kombu's serverless transport (messages are files under broker_dir);
    # "redis://host:6379/0" in production.
    broker_url: str = "filesystem://"
    broker_dir: Path = VAR / "broker"
    # Redis broker only: a prefix for every key the broker writes, so several deployments (or
    # test runs) can share one Redis database without consuming each other's tasks.
    broker_key_prefix: str = ""
    # Celery result backend; None: results are not stored (job state lives in the database).
    result_backend_url: str | None = None
    object_store_url: str = f"file://{VAR / 'objects'}"
    model_store: Path = VAR / "models"
    work_dir: Path = VAR / "work"

    # S3 (object_store_url = s3://bucket[/prefix]); unset keys fall back to boto3's chain.
    s3_endpoint_url: str | None = None
    # Endpoint written into presigned download URLs when clients reach S3 by another name.
    s3_public_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_create_bucket: bool = False
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None

    # API server.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    max_upload_bytes: int = Field(default=1 * GiB, ge=1)
    # Every uploaded file is read as text within these, counted after gzip decompression: a
    # small .gz can expand to far more than max_upload_bytes.
    max_decompressed_bytes: int = Field(default=4 * GiB, ge=1)
    max_line_bytes: int = Field(default=4 * MiB, ge=1024)
    # Uploads are spooled here while they are validated (None: the system temp dir).
    upload_dir: Path | None = None
    presigned_url_expires: int = Field(default=3600, ge=1, le=7 * 24 * 3600)

    # Logs: "json" (one object per line, for a log pipeline) or "text" (for a terminal).
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Redis for state the API processes share (rate limits). None: the broker's, when the
    # broker is Redis; otherwise each process keeps its own (the embedded default).
    redis_url: str | None = None
    # Per API key: requests a second, sustained, and the burst allowed on top (0: no limit).
    rate_limit_per_second: float = Field(default=50.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    # Per client address: failed authentications allowed at once, and per minute after that;
    # past them the address gets 429 whatever key it sends, until its bucket refills.
    auth_failure_burst: int = Field(default=20, ge=1)
    auth_failures_per_minute: float = Field(default=10.0, gt=0)
    # Seconds a verified key is trusted without asking the database again: a key revoked in
    # another API process stops working there within this time (at once in this one).
    api_key_cache_ttl_s: float = Field(default=10.0, ge=0)
    # Per-tenant quotas (a tenant's own row can override them: `tailor set-quota`).
    max_concurrent_jobs: int = Field(default=8, ge=1)
    max_stored_bytes: int = Field(default=100 * GiB, ge=0)

    # Embedding serving.
    embed_model_cache_size: int = Field(default=4, ge=1)
    embed_cache_dir: Path = VAR / "cache" / "models"
    # Concurrent requests share micro-batches (docs/serving.md): a batch holds at most
    # embed_batch_tokens padded tokens (0: 8,192 on a CPU, 65,536 on a GPU); an idle encoder
    # waits up to embed_batch_wait_ms for more inputs; embed_encoders threads run batches (0:
    # one on a GPU; on a CPU one per core, up to 4, the cores shared among their torch threads).
    embed_batch_tokens: int = Field(default=0, ge=0)
    embed_batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    embed_encoders: int = Field(default=0, ge=0, le=64)
    # Inputs per request (/v1/embed, /v1/embeddings, documents per /v1/rerank), and queued
    # inputs per model past which requests get a 503 with Retry-After.
    embed_max_inputs: int = Field(default=2048, ge=1)
    embed_max_queued_inputs: int = Field(default=65_536, ge=1)

    # Bulk embedding jobs: documents per shard file when the request names none (a worker
    # killed mid-run loses at most the shard it was writing).
    embed_job_shard_documents: int = Field(default=4096, ge=1, le=1_000_000)

    # Uploaded models (POST /v1/models): the .tar.gz as sent, what it may unpack to, and how
    # many files it may hold.
    model_upload_max_bytes: int = Field(default=4 * GiB, ge=1)
    model_unpacked_max_bytes: int = Field(default=8 * GiB, ge=1)
    model_upload_max_files: int = Field(default=1000, ge=1)

    # Where every job's query generation runs: a deployment choice, never a tenant's (an
    # endpoint receives the operator's key, TAILOR_GENERATOR_API_KEY). None: the recipe's own
    # (in-process transformers); "vllm": vLLM on the GPU worker (the `gpu` extra), loading the
    # job's generator from the model store; "openai": the OpenAI-compatible server at
    # generation_endpoint, and every job's generator is the model it serves, generation_model.
    generation_backend: Literal["transformers", "vllm", "openai"] | None = None
    generation_endpoint: str | None = None
    generation_model: str | None = None

    # Worker / queue. Seconds a delivered but unacknowledged stage task may run before the
    # broker redelivers it (acks_late): longer than the slowest stage (tests use a few seconds).
    visibility_timeout: int = Field(default=6 * 3600, ge=1)
    # A running stage writes its progress, and reads its job's status to notice a cancel, at
    # most this often (seconds).
    progress_interval_s: float = Field(default=1.0, gt=0)
    # A running stage renews its job's lease every lease_ttl_s / 5 seconds. A second delivery of
    # that stage on another host waits until the lease lapses this long after the holder's last
    # heartbeat (on the holder's own host it takes over as soon as the holder's process is gone).
    lease_ttl_s: float = Field(default=300.0, gt=0)
    # A stage whose process ended without a word (killed: out of memory, or its host lost) runs
    # again, up to this many such losses; the next one fails the job (`worker_lost`) instead of
    # the broker giving the task back for ever. A worker's shutdown is not counted.
    max_stage_losses: int = Field(default=2, ge=0, le=100)
    # A cancelled or failed job's intermediate objects (stage outputs, partial shards) and work
    # folders are kept this long for a look, then removed; a deleted job's go at once. Workers
    # sweep for them every retention_sweep_s (app.jobs.retention).
    intermediate_retention_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    retention_sweep_s: float = Field(default=600.0, gt=0)

    # Webhooks (docs/operations.md). Attempts per delivery (a redelivery grants as many again),
    # the wait before attempt n+1 (base * 2^(n-1), at most backoff_max, with up to 10 % jitter)
    # and one attempt's time limit.
    # The cap stays under visibility_timeout: a countdown past it is redelivered early (which
    # the delivery's claim absorbs, but costs a wasted task).
    webhook_max_attempts: int = Field(default=10, ge=1, le=50)
    webhook_backoff_base_s: float = Field(default=10.0, gt=0)
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # SSRF guard: endpoints whose host resolves to a private, link-local, reserved or loopback
    # address are refused (at registration and before every attempt) unless allowed here.
    # Loopback only for development and tests; private networks for an on-premises receiver.
    webhook_allow_loopback: bool = False
    webhook_allow_private_networks: bool = False

    # Prometheus. /metrics on the API answers anyone unless a token is set, then only
    # `Authorization: Bearer <token>`. A worker serves its metrics on worker_metrics_port
    # (0: none) from its main process, its pool processes' figures included.
    metrics_token: SecretStr | None = None
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _endpoint_and_model_for_openai(self) -> Settings:
        if self.generation_backend == "openai":
            missing = [f"TAILOR_{name.upper()}" for name in ("generation_endpoint",
                                                              "generation_model")
                       if not getattr(self, name)]
            if missing:
                raise ValueError(f"TAILOR_GENERATION_BACKEND=openai needs {' and '.join(missing)}")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call `get_settings.cache_clear()`)."""
    return Settings()
