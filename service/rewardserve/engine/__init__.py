"""Scoring engine: input encoding, reward models, dynamic batching."""
