"""Models: base students on offer (from the model registry) and a tenant's tuned models."""
