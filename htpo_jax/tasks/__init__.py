"""Synthetic verifiable tasks (small, deterministic) for the embedded default model."""
