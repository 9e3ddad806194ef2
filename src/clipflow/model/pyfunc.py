"""MLflow "model from code" for a clipflow CLIP model: text in, normalised embeddings out.

MLflow stores this file with the model and runs it on load, so nothing is unpickled; the
weights come from the `checkpoint` artifact and load with `weights_only=True`. The logged
model's signature (`clipflow.registry.models.log_clip_model`) makes MLflow hand `predict` a
one-column DataFrame of texts, whether the caller passed a list or a DataFrame.
"""

import mlflow
import numpy as np
import pandas as pd


class ClipTextEmbedder(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from clipflow import model as clip_model

        self.clip = clip_model.load(context.artifacts["checkpoint"])

    # A DataFrame hint: MLflow infers no schema from it (the signature is logged explicitly) and
    # does not warn that the hints are missing.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return np.asarray(self.clip.encode_text(model_input.iloc[:, 0].astype(str).tolist()))


mlflow.models.set_model(ClipTextEmbedder())
