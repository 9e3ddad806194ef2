"""How every image becomes pixels: one decode for ingest, evaluation and serving.

Ingest stores what `decode` returns (downscaled and re-encoded as JPEG), evaluation reads those
shards, and the served endpoints decode uploads through it too, so a served embedding sees an
image as training and evaluation saw it: upright by its EXIF orientation, 16-bit samples scaled
to 8 bits, transparency composited on white.

Large images are decoded straight to near the size they are used at: a JPEG decodes at 1/2, 1/4
or 1/8 scale when its shorter side stays at least `min_side` (`PIL.Image.Image.draft`), and what
is still at least twice that is reduced by an integer factor (`PIL.Image.Image.reduce`) before
the caller's own resize. Callers check sizes and limits first and turn PIL's errors into their own.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})


def draft(image: Image.Image, min_side: int | None) -> int:
    """Ask the decoder of an opened, not yet loaded image for the smallest size it can decode
    whose shorter side stays at least `min_side`; returns the pixels decoding will produce.

    Only JPEG decodes at a reduced scale; other formats are unchanged. A second call changes
    nothing, so `decode` can call it again.
    """
    if min_side is not None and image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    return image.width * image.height


def decode(image: Image.Image, min_side: int | None = None) -> Image.Image:
    """Decode an opened image into upright 8-bit RGB, its shorter side reduced to no less than `min_side`.

    Args:
        image: a freshly opened image (`PIL.Image.open`), whose pixels are decoded here; it is
            turned upright in place, and returned itself when it is already RGB at that size.
        min_side: the shorter side the caller resizes to next; None keeps every pixel.

    Raises:
        OSError, SyntaxError, ValueError: what PIL raises for truncated or corrupt pixel data.
    """
    draft(image, min_side)
    image.load()
    # In place, and no copy of an image already in RGB: a large image is held once, not three times.
    ImageOps.exif_transpose(image, in_place=True)
    rgb = to_rgb(image)
    factor = min(rgb.size) // min_side if min_side else 1
    return rgb.reduce(factor) if factor >= 2 else rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from CMYK, palette, 16-bit and alpha modes; transparency goes on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit samples scaled to 8 bits; Pillow's own convert would clip everything above 255.
        samples = np.clip(np.asarray(image), 0, 65535) >> 8
        image = Image.fromarray(samples.astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
