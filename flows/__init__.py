"""Prefect flows: short recipes that wire tasks together. No business logic here."""
