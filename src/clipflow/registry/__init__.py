"""The MLflow side of models: logging, downloading, registering and the promotion gate."""
