"""Serving: the package step, the search gallery, the encoder (classify, rank), inputs and limits, HTTP, batching."""
