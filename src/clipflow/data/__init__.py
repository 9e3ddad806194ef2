"""Data: the built-in dataset, WebDataset shards, and the ingest step."""
