"""Python client for the Tailor API: upload a corpus, specialize a retriever, download it."""

from tailor_client.client import Client
from tailor_client.download import ArchiveError
from tailor_client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TailorError,
)
from tailor_client.resources import WaitTimeout
from tailor_client.webhooks import WebhookVerificationError

__all__ = [
    "APIConnectionError",
    "APIError",
    "ArchiveError",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "InvalidRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "TailorError",
    "WaitTimeout",
    "WebhookVerificationError",
]
