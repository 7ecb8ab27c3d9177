"""Corpora: a tenant's uploaded BEIR document collections."""
