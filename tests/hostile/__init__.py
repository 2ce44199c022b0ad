"""Hostile guests and lost writes (issue 8)."""
