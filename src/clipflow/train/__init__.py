"""Training: the torchrun and TrainJob launchers, the worker job they hand over, the DDP loop, losses, checkpoints."""
