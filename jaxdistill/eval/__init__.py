"""Metrics and the evaluation harness."""
