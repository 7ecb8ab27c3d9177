"""Webhooks: tenant endpoints, signed job events, deliveries with retries."""
