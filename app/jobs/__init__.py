"""Jobs: specialization runs of a base model on a tenant's corpus."""
