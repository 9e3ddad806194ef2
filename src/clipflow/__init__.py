"""clipflow: train, evaluate and serve CLIP-style image-text models as an MLOps pipeline."""
