"""Evaluation: metrics, benchmark loaders and synthetic data."""
