"""Per-row checks on what a source hands over: the caption text and the image bytes.

They run inside ingest, where the bytes already are, so a bad row costs one read and is never
written to a shard. Each failure raises `Rejected` whose message is the quarantine reason.
"""

from __future__ import annotations

import io
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from clipflow.images import decode
from clipflow.params import ValidateParams

ALLOWED_CONTROL = {"\t", "\n", "\r"}


class Rejected(Exception):
    """A row that fails a check; the message says why."""


def check_caption(caption: object, params: ValidateParams) -> str:
    """The caption as text, or `Rejected` when it is missing, empty, too long or holds control characters."""
    if caption is None or (isinstance(caption, float) and caption != caption):
        raise Rejected("caption is missing")
    if not isinstance(caption, str):
        raise Rejected(f"caption is {type(caption).__name__}, not text")
    if not caption.strip():
        raise Rejected("caption is empty")
    if len(caption) > params.caption_max_chars:
        raise Rejected(
            f"caption is {len(caption)} characters, more than validate.caption_max_chars={params.caption_max_chars}"
        )
    if len(caption) < params.caption_min_chars:
        raise Rejected(
            f"caption is {len(caption)} characters, fewer than validate.caption_min_chars={params.caption_min_chars}"
        )
    control = sorted({c for c in caption if unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROL})
    if control:
        raise Rejected(f"caption holds control characters {[f'U+{ord(c):04X}' for c in control]}")
    return caption


@dataclass(frozen=True)
class CheckedImage:
    """An image that passed every check, converted to RGB and downscaled, encoded as JPEG."""

    jpeg: bytes
    width: int
    height: int
    source_width: int
    source_height: int
    source_format: str
    source_mode: str


def check_image(payload: bytes, params: ValidateParams, short_side: int) -> CheckedImage:
    """Check, decode and convert one image; downscale it so its shorter side is at most `short_side`.

    Raises:
        Rejected: empty, not an image, a format outside `validate.image_formats`, too many pixels
            (checked from the header, before any decoding), sides outside [min_side, max_side],
            or pixel data that does not decode (truncated, corrupt).
    """
    if not payload:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, on large images; the pixel cap below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload))
    except Image.DecompressionBombError as exc:
        raise Rejected(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise Rejected("not an image: no image format recognises these bytes") from None
    except Exception as exc:  # Pillow raises many types for bytes that are not an image
        raise Rejected(f"not a decodable image: {_first_line(exc)}") from None
    width, height = image.size
    if image.format not in params.image_formats:
        raise Rejected(f"image format {image.format} not in validate.image_formats")
    if width * height > params.max_image_pixels:
        raise Rejected(
            f"{width}x{height} = {width * height} pixels, more than validate.max_image_pixels={params.max_image_pixels}"
        )
    if min(width, height) < params.min_side or max(width, height) > params.max_side:
        raise Rejected(
            f"{width}x{height} has a side outside [validate.min_side, validate.max_side] = "
            f"[{params.min_side}, {params.max_side}]"
        )
    mode = image.mode
    try:
        rgb = decode(image, short_side)
    except Exception as exc:  # truncated or corrupt pixel data surfaces only while decoding
        raise Rejected(f"image data does not decode ({image.format}): {_first_line(exc)}") from None
    scale = short_side / min(rgb.size)
    if scale < 1:
        rgb = rgb.resize(
            (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BICUBIC
        )
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=95)
    return CheckedImage(buffer.getvalue(), rgb.width, rgb.height, width, height, image.format, mode)


def reason_counts(reasons: Iterable[str]) -> dict[str, int]:
    """Rows per kind of reason (the text before the first colon), most common first."""
    return dict(Counter(reason.split(":")[0] for reason in reasons).most_common())


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
