"""Rewards built from parts: rule rewards (no model) and composite specifications."""
