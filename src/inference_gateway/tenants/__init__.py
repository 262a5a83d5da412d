"""Who is calling: tenant headers, API keys, the org gate, and their in-memory caches."""
