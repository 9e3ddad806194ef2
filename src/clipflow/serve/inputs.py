"""What the served endpoints accept: request limits, input checks and safe image decoding.

The BentoML service (`serving/service.py`) calls these before any model work, so every bad
input becomes a 400 with a message that names the field and the limit, no upload can make
a worker decode a decompression bomb, and no request more pixels than `max_request_pixels`
(counted from the headers, before anything is decoded). Images decode through
`clipflow.images`, as ingest decodes them. Each check raises
`bentoml.exceptions.InvalidArgument`, which BentoML answers with 400.

`Limits` is the one list of request limits: `clipflow package` stores the `serve:` values of
its fields (`LIMITS`) in the BentoML model, and the service reads them back into it, so a new
limit is a field here and a key of the same name in `serve:` (`clipflow.params.ServeParams`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import PIL.Image
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel

from clipflow import images
from clipflow.errors import ClipflowError
from clipflow.prompts import split_template

ItemsT = TypeVar("ItemsT", bound=Sequence)


class Limits(BaseModel):
    """Request limits, from `serve:` in params.yaml, stored in the BentoML model's metadata."""

    max_labels: int
    max_texts: int
    max_text_chars: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_pixels: int
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


def check_templates(templates: Sequence[str], labels: Sequence[str], limits: Limits) -> None:
    """Refuse prompt templates that do not hold the label exactly once as `{}`, or make prompts too long.

    At most `max_labels` templates, and at most `max_prompts` prompts (labels x templates),
    since every prompt is a text the model encodes for this call. A template is the literal
    text around one `{}` (`clipflow.prompts.split_template`: no name, conversion or format spec;
    literal braces are written `{{` and `}}`), and each filled prompt is at most `max_text_chars`.
    """
    check_texts("templates", templates, limits.max_labels, limits.max_text_chars)
    prompts = len(labels) * len(templates)
    if prompts > limits.max_prompts:
        raise InvalidArgument(f"labels x templates = {prompts} prompts, at most {limits.max_prompts} allowed per call")
    longest_label = max(map(len, labels))
    for template in templates:
        try:
            before, after = split_template(template)
        except ClipflowError as exc:
            raise InvalidArgument(f"templates: {exc}") from None
        if len(before) + longest_label + len(after) > limits.max_text_chars:
            raise InvalidArgument(
                f"templates: {template[:80]!r} with the longest label makes a prompt of "
                f"{len(before) + longest_label + len(after)} characters, at most {limits.max_text_chars}"
            )


def check_text_list(field: str, texts: ItemsT, limits: Limits) -> ItemsT:
    """A list of texts to encode (texts, queries, candidates): `max_texts` of `max_text_chars` at most."""
    return check_texts(field, texts, limits.max_texts, limits.max_text_chars)


def check_labels(labels: ItemsT, templates: Sequence[str] | None, limits: Limits) -> ItemsT:
    """Zero-shot labels (`max_labels` of `max_text_chars` at most) and, when given, their templates."""
    check_texts("labels", labels, limits.max_labels, limits.max_text_chars)
    if templates is not None:
        check_templates(templates, labels, limits)
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


def check_page(k: int, offset: int, limits: Limits) -> int:
    """A page of `k` results after `offset` others, within the `max_k` best; returns `offset`."""
    check_k(k, limits)
    if offset < 0 or k + offset > limits.max_k:
        raise InvalidArgument(f"offset must be between 0 and max_k - k = {limits.max_k - k}, got {offset}")
    return offset


def check_item_id(item_id: str, limits: Limits, field: str = "id") -> str:
    """An item id of at most `max_text_chars`; returns it."""
    if len(item_id) > limits.max_text_chars:
        raise InvalidArgument(f"{field}: {len(item_id)} characters, at most {limits.max_text_chars}")
    return item_id


def check_image_count(field: str, images: ItemsT, limits: Limits) -> ItemsT:
    """A non-empty list of at most `max_batch` images (files or base64 strings); returns it."""
    return check_count(field, images, limits.max_batch)


def open_images(field: str, paths: Sequence[Path], limits: Limits, min_side: int) -> list[PIL.Image.Image]:
    """Decode a list of at most `max_batch` uploaded image files; each error names `field[i]`.

    Every header is read, and the request's pixel budget checked, before any image is decoded.
    `min_side` is the shorter side the model's preprocess resizes to (`clipflow.images.decode`).
    """
    check_image_count(field, paths, limits)
    with contextlib.ExitStack() as files:
        sources = []
        for i, path in enumerate(paths):
            _check_bytes(f"{field}[{i}]", path.stat().st_size, limits)
            sources.append(files.enter_context(path.open("rb")))
        return _decode_all(field, sources, limits, min_side)


def decode_base64_images(field: str, texts: Sequence[str], limits: Limits, min_side: int) -> list[PIL.Image.Image]:
    """`open_images` for base64 strings (or `data:` URLs)."""
    check_image_count(field, texts, limits)
    payloads = [_base64_payload(text, limits, f"{field}[{i}]") for i, text in enumerate(texts)]
    return _decode_all(field, [io.BytesIO(payload) for payload in payloads], limits, min_side)


def open_image(path: Path, limits: Limits, min_side: int, field: str = "image") -> PIL.Image.Image:
    """Decode one uploaded image file into RGB, within the byte and pixel limits.

    BentoML's own PIL input answers 500 to undecodable bytes, so uploads arrive as files and
    are decoded here.
    """
    _check_bytes(field, path.stat().st_size, limits)
    with path.open("rb") as file:
        (image,) = _decode_all(field, [file], limits, min_side, names=[field])
    return image


def guard_decoder(limits: Limits) -> None:
    """Set PIL's own decompression-bomb guard for this process from `max_image_pixels`.

    PIL's guard (an error at twice this) would otherwise stay at its default, refusing images
    below a larger configured limit.
    """
    PIL.Image.MAX_IMAGE_PIXELS = limits.max_image_pixels


def _check_bytes(field: str, size: int, limits: Limits) -> None:
    if size > limits.max_image_bytes:
        raise InvalidArgument(f"{field} has {size} bytes, at most {limits.max_image_bytes} allowed")


def _base64_payload(text: str, limits: Limits, field: str) -> bytes:
    """The bytes of a base64 string (optionally a `data:image/...;base64,` URL), within `max_image_bytes`."""
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
    _check_bytes(field, len(data), limits)
    return data


def _decode_all(
    field: str, files: Sequence[BinaryIO], limits: Limits, min_side: int, names: Sequence[str] | None = None
) -> list[PIL.Image.Image]:
    """Open every image's header, refuse the request over its pixel budget, then decode them in turn.

    The budget counts the pixels decoding produces, after a JPEG's reduced-scale decode, so a
    large photo costs what it is decoded at; each image is reduced to near `min_side` as soon as
    it is decoded, so at most one full-size image is held at a time.
    """
    names = names or [f"{field}[{i}]" for i in range(len(files))]
    with contextlib.ExitStack() as opened:
        headers = [
            opened.enter_context(_open_header(file, name, limits)) for file, name in zip(files, names, strict=True)
        ]
        pixels = sum(images.draft(image, min_side) for image in headers)
        if pixels > limits.max_request_pixels:
            raise InvalidArgument(
                f"{field}: {pixels} pixels to decode in this request, at most {limits.max_request_pixels} "
                "(serve.max_request_pixels): send fewer or smaller images"
            )
        decoded = []
        for image, name in zip(headers, names, strict=True):
            decoded.append(_decode_pixels(image, name, limits, min_side))
            if decoded[-1] is not image:
                image.close()  # its full-size pixels go now, not when the whole request is decoded
        return decoded


@contextlib.contextmanager
def _open_header(file: BinaryIO, field: str, limits: Limits) -> Iterator[PIL.Image.Image]:
    """The opened image (its header read, no pixels decoded yet), within `max_image_pixels`."""
    try:
        image = PIL.Image.open(file)
    except PIL.Image.DecompressionBombError:
        raise InvalidArgument(f"{field} has more than {limits.max_image_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError):
        # What PIL raises for unknown formats (UnidentifiedImageError is an OSError) and corrupt headers.
        raise InvalidArgument(f"{field} could not be decoded") from None
    with image:
        pixels = image.width * image.height
        if pixels > limits.max_image_pixels:
            raise InvalidArgument(f"{field} has {pixels} pixels, at most {limits.max_image_pixels} allowed")
        yield image


def _decode_pixels(image: PIL.Image.Image, field: str, limits: Limits, min_side: int) -> PIL.Image.Image:
    try:
        return images.decode(image, min_side)
    except PIL.Image.DecompressionBombError:
        raise InvalidArgument(f"{field} has more than {limits.max_image_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError):
        # What PIL raises for truncated data and corrupt pixel data.
        raise InvalidArgument(f"{field} could not be decoded") from None
