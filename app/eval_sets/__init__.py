"""Eval sets: a tenant's own relevance judgements (BEIR queries + qrels) for a corpus."""
