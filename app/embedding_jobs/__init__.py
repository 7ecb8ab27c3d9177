"""Bulk embedding jobs: a stored corpus embedded with one model on the workers."""
