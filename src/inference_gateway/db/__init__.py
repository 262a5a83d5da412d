"""Migrations and the database's upkeep: partition maintenance."""
