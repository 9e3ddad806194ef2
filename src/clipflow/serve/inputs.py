"""What the served endpoints accept: request limits, input checks and safe image decoding.

The BentoML service (`serving/service.py`) calls these before any model work, so every bad
input becomes a 400 with a message that names the field and the limit, and no upload can make
a worker decode a decompression bomb. Each check raises `bentoml.exceptions.InvalidArgument`,
which BentoML answers with 400.

`Limits` is the one list of request limits: `clipflow package` stores the `serve:` values of
its fields (`LIMITS`) in the BentoML model, and the service reads them back into it, so a new
limit is a field here and a key of the same name in `serve:` (`clipflow.params.ServeParams`).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import PIL.Image
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel

ItemsT = TypeVar("ItemsT", bound=Sequence)


class Limits(BaseModel):
    """Request limits, from `serve:` in params.yaml, stored in the BentoML model's metadata."""

    max_labels: int
    max_texts: int
    max_text_chars: int
    max_image_bytes: int
    max_image_pixels: int
    max_prompts: int
    max_batch: int
    max_k: int


# The limits' names, as `serve:` in params.yaml and the BentoML model's metadata spell them.
LIMITS: tuple[str, ...] = tuple(Limits.model_fields)


def check_count(field: str, items: ItemsT, max_items: int) -> ItemsT:
    """Refuse an empty list or one longer than `max_items`; returns `items`."""
    if not items:
        raise InvalidArgument(f"{field} must not be empty")
    if len(items) > max_items:
        raise InvalidArgument(f"{field}: {len(items)} given, at most {max_items} allowed")
    return items


def check_texts(field: str, texts: ItemsT, max_items: int, max_chars: int) -> ItemsT:
    """Refuse an empty list, more than `max_items` texts, or a text longer than `max_chars`; returns `texts`."""
    check_count(field, texts, max_items)
    longest = max(len(text) for text in texts)
    if longest > max_chars:
        raise InvalidArgument(f"{field}: a text has {longest} characters, at most {max_chars}")
    return texts


def check_templates(templates: Sequence[str], labels: int, limits: Limits) -> None:
    """Refuse prompt templates that do not hold the label exactly once as `{}`.

    At most `max_labels` templates of at most `max_text_chars` each, and at most `max_prompts`
    prompts (labels x templates), since every prompt is a text the model encodes for this call.

    Templates are filled with `str.format`, so any other replacement field (`{0}`, `{name}`, a
    second `{}`) would fail inside the model code; literal braces are written `{{` and `}}`.
    """
    check_texts("templates", templates, limits.max_labels, limits.max_text_chars)
    for template in templates:
        try:
            filled = template.format("\0")
        except (IndexError, KeyError, ValueError):
            filled = None
        if filled is None or filled.count("\0") != 1 or "{}" not in template:
            raise InvalidArgument(
                f"templates: {template[:80]!r} must contain '{{}}' exactly once for the label "
                "and no other replacement field (write literal braces as '{{' and '}}')"
            )
    prompts = labels * len(templates)
    if prompts > limits.max_prompts:
        raise InvalidArgument(f"labels x templates = {prompts} prompts, at most {limits.max_prompts} allowed per call")


def check_text_list(field: str, texts: ItemsT, limits: Limits) -> ItemsT:
    """A list of texts to encode (texts, queries, candidates): `max_texts` of `max_text_chars` at most."""
    return check_texts(field, texts, limits.max_texts, limits.max_text_chars)


def check_labels(labels: ItemsT, templates: Sequence[str] | None, limits: Limits) -> ItemsT:
    """Zero-shot labels (`max_labels` of `max_text_chars` at most) and, when given, their templates."""
    check_texts("labels", labels, limits.max_labels, limits.max_text_chars)
    if templates is not None:
        check_templates(templates, len(labels), limits)
    return labels


def check_query_text(field: str, text: str, limits: Limits) -> str:
    """One query text of at most `max_text_chars`; returns it."""
    check_texts(field, [text], 1, limits.max_text_chars)
    return text


def check_k(k: int, limits: Limits) -> int:
    """A number of results between 1 and `max_k`; returns it."""
    if not 1 <= k <= limits.max_k:
        raise InvalidArgument(f"k must be between 1 and {limits.max_k}, got {k}")
    return k


def check_item_id(item_id: str, limits: Limits, field: str = "id") -> str:
    """An item id of at most `max_text_chars`; returns it."""
    if len(item_id) > limits.max_text_chars:
        raise InvalidArgument(f"{field}: {len(item_id)} characters, at most {limits.max_text_chars}")
    return item_id


def check_image_count(field: str, images: ItemsT, limits: Limits) -> ItemsT:
    """A non-empty list of at most `max_batch` images (files or base64 strings); returns it."""
    return check_count(field, images, limits.max_batch)


def open_images(field: str, paths: Sequence[Path], limits: Limits) -> list[PIL.Image.Image]:
    """Decode a list of at most `max_batch` uploaded image files; each error names `field[i]`."""
    check_image_count(field, paths, limits)
    return [open_image(path, limits, f"{field}[{i}]") for i, path in enumerate(paths)]


def decode_base64_images(field: str, texts: Sequence[str], limits: Limits) -> list[PIL.Image.Image]:
    """`open_images` for base64 strings (or `data:` URLs)."""
    check_image_count(field, texts, limits)
    return [decode_base64_image(text, limits, f"{field}[{i}]") for i, text in enumerate(texts)]


def guard_decoder(limits: Limits) -> None:
    """Set PIL's own decompression-bomb guard for this process from `max_image_pixels`.

    PIL's guard (an error at twice this) would otherwise stay at its default, refusing images
    below a larger configured limit.
    """
    PIL.Image.MAX_IMAGE_PIXELS = limits.max_image_pixels


def open_image(path: Path, limits: Limits, field: str = "image") -> PIL.Image.Image:
    """Decode an uploaded image file into RGB, within the byte and pixel limits.

    BentoML's own PIL input answers 500 to undecodable bytes, so uploads arrive as files and
    are decoded here.
    """
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise InvalidArgument(f"{field} has {size} bytes, at most {limits.max_image_bytes} allowed")
    with path.open("rb") as file:
        return _decode(file, limits, field)


def decode_base64_image(text: str, limits: Limits, field: str = "image") -> PIL.Image.Image:
    """Decode a base64 string (optionally a `data:image/...;base64,` URL) into an RGB image."""
    _, comma, payload = text.partition(",") if text.startswith("data:") else ("", "", text)
    if text.startswith("data:") and not comma:
        raise InvalidArgument(f"{field} is a data URL without a ',' before its payload")
    # base64 holds 3 bytes in 4 characters: refuse an oversized image before decoding it.
    estimate = len(payload) * 3 // 4
    if estimate > limits.max_image_bytes + 2:
        raise InvalidArgument(f"{field} has about {estimate} bytes, at most {limits.max_image_bytes} allowed")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{field} is not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"{field} has {len(data)} bytes, at most {limits.max_image_bytes} allowed")
    return _decode(io.BytesIO(data), limits, field)


def _decode(file: io.BufferedIOBase, limits: Limits, field: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(file) as image:
            # Image.open reads only the header: refuse decompression bombs before decoding.
            pixels = image.width * image.height
            if pixels > limits.max_image_pixels:
                raise InvalidArgument(f"{field} has {pixels} pixels, at most {limits.max_image_pixels} allowed")
            return image.convert("RGB")
    except PIL.Image.DecompressionBombError:
        raise InvalidArgument(f"{field} has more than {limits.max_image_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError):
        # What PIL raises for unknown formats (UnidentifiedImageError is an OSError),
        # truncated data and corrupt headers.
        raise InvalidArgument(f"{field} could not be decoded") from None
