"""The clipflow BentoML service: text and image embeddings and zero-shot classification.

`clipflow package` builds this file into a Bento together with the clipflow package and passes the
exact model tag, host and port as Bento arguments, so `bentoml serve <bento_tag>` needs nothing
else. Request limits are read from the model's metadata, written by `clipflow package` from
`serve:` in params.yaml, so a Bento keeps the limits it was built with.

    curl -s -X POST http://127.0.0.1:3000/encode_text -H 'content-type: application/json' \\
         -d '{"texts": ["a red circle"]}'
    curl -s -X POST http://127.0.0.1:3000/classify -F image=@shape.png \\
         -F 'labels=["red circle", "blue square"]'

Labels are words ("red circle"); `classify` turns each into the prompt ensemble evaluation
uses (`evaluate.templates`, stored with the model), so served probabilities behave like the
evaluated zero-shot accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import bentoml
import PIL.Image
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel

if TYPE_CHECKING:
    import torch


class BuildArgs(BaseModel):
    """Set by `clipflow package` (`bentoml build --arg`) and stored in the Bento."""

    model_tag: str
    host: str
    port: int


class Limits(BaseModel):
    """Request limits, stored in the BentoML model's metadata under `limits`."""

    max_labels: int
    max_texts: int
    max_text_chars: int
    max_image_bytes: int
    max_image_pixels: int


class LabelProbability(BaseModel):
    label: str
    probability: float


ARGS = bentoml.use_arguments(BuildArgs)


@bentoml.service(name="clipflow", http={"host": ARGS.host, "port": ARGS.port})
class Clipflow:
    bento_model = bentoml.models.BentoModel(ARGS.model_tag)

    def __init__(self) -> None:
        # Imported here: `bentoml serve` and `bentoml build` import this module only to read the
        # service's config, and torch would add seconds to both.
        from clipflow import model as clip_model

        self.clip = clip_model.load(self.bento_model.path_of(clip_model.CHECKPOINT_FILE))
        self.logit_scale = self.clip.model.logit_scale.exp().item()
        self.limits = Limits(**self.bento_model.info.metadata["limits"])
        self.templates = self.bento_model.info.metadata["templates"]
        # PIL's own bomb guard (an error at twice this) would otherwise stay at its default,
        # refusing images below a larger configured limit.
        PIL.Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels

    @bentoml.api
    def encode_text(self, texts: list[str]) -> list[list[float]]:
        """L2-normalised embeddings of `texts`, one row per text."""
        self._check_texts("texts", texts, self.limits.max_texts)
        return self.clip.encode_text(texts).tolist()

    @bentoml.api
    def encode_image(self, image: Path) -> list[float]:
        """The L2-normalised embedding of an uploaded image (PNG, JPEG, WebP, ...)."""
        return self._embed_image(image)[0].tolist()

    @bentoml.api
    def classify(self, image: Path, labels: list[str]) -> list[LabelProbability]:
        """Zero-shot classify an image: every label with its probability, most likely first.

        Probabilities are the softmax over labels of the model's scaled cosine similarity
        between the image and each label's prompt ensemble.
        """
        self._check_texts("labels", labels, self.limits.max_labels)
        image_features = self._embed_image(image)  # (1, D)
        text_features = self.clip.encode_labels(labels, self.templates)  # (L, D)
        probabilities = (self.logit_scale * image_features @ text_features.T).softmax(dim=-1)[0].tolist()
        ranked = sorted(zip(labels, probabilities, strict=True), key=lambda pair: pair[1], reverse=True)
        return [LabelProbability(label=label, probability=p) for label, p in ranked]

    def _check_texts(self, field: str, texts: list[str], max_items: int) -> None:
        if not texts:
            raise InvalidArgument(f"{field} must not be empty")
        if len(texts) > max_items:
            raise InvalidArgument(f"{field}: {len(texts)} given, at most {max_items} allowed")
        longest = max(len(text) for text in texts)
        if longest > self.limits.max_text_chars:
            raise InvalidArgument(f"{field}: a text has {longest} characters, at most {self.limits.max_text_chars}")

    def _embed_image(self, path: Path) -> torch.Tensor:
        """Decode an upload ourselves: BentoML's PIL input answers 500 to undecodable bytes."""
        size = path.stat().st_size
        if size > self.limits.max_image_bytes:
            raise InvalidArgument(f"image has {size} bytes, at most {self.limits.max_image_bytes} allowed")
        try:
            with PIL.Image.open(path) as image:
                # Image.open reads only the header: refuse decompression bombs before decoding.
                pixels = image.width * image.height
                if pixels > self.limits.max_image_pixels:
                    raise InvalidArgument(f"image has {pixels} pixels, at most {self.limits.max_image_pixels} allowed")
                rgb = image.convert("RGB")
        except PIL.Image.DecompressionBombError:
            raise InvalidArgument(f"image has more than {self.limits.max_image_pixels} pixels") from None
        except (OSError, SyntaxError, ValueError):
            # What PIL raises for unknown formats (UnidentifiedImageError is an OSError),
            # truncated data and corrupt headers.
            raise InvalidArgument("image could not be decoded") from None
        return self.clip.encode_images(self.clip.preprocess(rgb).unsqueeze(0))
