"""Evaluation: zero-shot and retrieval metrics, and the evaluate step."""
