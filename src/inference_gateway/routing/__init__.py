"""Which model server answers for a model name."""
