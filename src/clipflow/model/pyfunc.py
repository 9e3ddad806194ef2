"""MLflow "model from code" for a clipflow CLIP model: text in, normalised embeddings out.

MLflow stores this file with the model and runs it on load, so nothing is unpickled; the
weights come from the `checkpoint` artifact and load with `weights_only=True`.
"""

import mlflow
import numpy as np
import pandas as pd


class ClipTextEmbedder(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from clipflow import model as clip_model

        self.clip = clip_model.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            texts = model_input.iloc[:, 0].astype(str).tolist()
        else:
            texts = [str(text) for text in model_input]
        return np.asarray(self.clip.encode_text(texts))


mlflow.models.set_model(ClipTextEmbedder())
