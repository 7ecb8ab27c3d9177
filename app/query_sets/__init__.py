"""Query sets: a customer's own queries without judgements, for training."""
