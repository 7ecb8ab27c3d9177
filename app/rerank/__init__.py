"""Reranking: POST /v1/rerank scores documents against a query with a catalogued teacher."""
