"""Tenants and their API keys (managed from the CLI; used by every route's authentication)."""
