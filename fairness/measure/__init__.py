"""Fairness and latency measures, from per-request records."""
