"""Embedding serving: the only part of the app that loads models (torch is imported lazily)."""
