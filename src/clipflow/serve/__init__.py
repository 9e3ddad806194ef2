"""Serving: packaging a model into a Bento, its gallery, the encoder (classify, rank), request inputs and limits, HTTP and batching."""
