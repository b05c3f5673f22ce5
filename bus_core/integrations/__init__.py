"""Integrations with hospital systems."""
