"""Training: the torchrun launcher, the DDP worker, batches and losses."""
