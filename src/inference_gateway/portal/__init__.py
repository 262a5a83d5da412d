"""The read side: usage as tenants and operators see it."""
