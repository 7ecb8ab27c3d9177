"""API keys a tenant manages itself: create (the secret shown once), list, read, revoke."""
