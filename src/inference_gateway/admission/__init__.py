"""Whether a request may start: rate limits and token quotas, shared through Redis."""
