"""Images and servers that real sources hand over: good ones in odd modes, and broken ones."""

from __future__ import annotations

import contextlib
import io
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import numpy as np
from PIL import Image

from tests.support.servers import local_http_server


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb_png(colour: tuple[int, int, int], size: tuple[int, int] = (96, 80)) -> bytes:
    return encoded(Image.new("RGB", size, colour), "PNG")


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    whole = encoded(Image.fromarray(noise), "JPEG", quality=90)
    return whole[: len(whole) // 2]


def random_bytes() -> bytes:
    return np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def huge_png(side: int = 30000) -> bytes:
    """A real, valid 1-bit PNG of side x side pixels that compresses to about 100 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed bits of one row
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def cmyk_jpeg() -> bytes:
    # Pure cyan+yellow ink: green on screen.
    return encoded(Image.new("CMYK", (64, 64), (255, 0, 255, 0)), "JPEG", quality=95)


def palette_png() -> bytes:
    return encoded(Image.new("RGB", (64, 64), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def gray16_png() -> bytes:
    """16-bit grayscale at 3/4 of full scale: 8-bit 191 after conversion, not clipped to 255."""
    return encoded(Image.fromarray(np.full((64, 64), 49152, dtype=np.uint16)), "PNG")


def rgba_png() -> bytes:
    """Fully transparent: must come out white, not black."""
    return encoded(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG")


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    delay_s = 0.0
    requests: Counter  # path -> times asked, per server

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?")[0]
        self.requests[path] += 1
        if self.path.startswith("/slow"):
            time.sleep(self.delay_s)
        # A server that is briefly overloaded, or down for good.
        if path.startswith("/down") or (path.startswith("/flaky") and self.requests[path] == 1):
            self.send_error(503)
            return
        payload = self.files.get(path)
        if payload is None:
            self.send_error(404)
            return
        # A client that timed out has hung up by now; that is the point of the slow path.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(files: dict[str, bytes], slow_delay_s: float) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1: `files` by path, 404 otherwise.

    `/slow...` answers late, `/flaky...` answers 503 the first time it is asked, `/down...` always.
    """
    handler = type("Handler", (_Handler,), {"files": files, "delay_s": slow_delay_s, "requests": Counter()})
    with local_http_server(handler) as url:
        yield url


# Bodies that never finish, by path. The endless ones send no Content-Length: HTTP/1.0 ends a body at close.
ENDLESS = {
    "/endless.png": (b"\x89PNG\r\n\x1a\n", b"\x00" * 65536),
    "/endless.csv": (b"image,caption\n", b"a.png,a row of a manifest that never ends\n" * 1500),
}


DROPPED_SHARD = "/shards/dropped.tar"


class _Hostile(BaseHTTPRequestHandler):
    image = b""
    gap_s = 2.0
    shard = b""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?")[0]
        # Each body only ends when the client hangs up, which is what the client must do.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if path == "/trickle.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(self.image)))
                self.end_headers()
                for i in range(len(self.image)):
                    self.wfile.write(self.image[i : i + 1])
                    time.sleep(self.gap_s)
            elif path == DROPPED_SHARD:
                # An S3 object whose connection drops halfway: the length promised, half of it sent.
                self.send_response(200)
                self.send_header("Content-Length", str(len(self.shard)))
                self.end_headers()
                self.wfile.write(self.shard[: len(self.shard) // 2])
            elif path in ENDLESS:
                head, filler = ENDLESS[path]
                self.send_response(200)
                self.end_headers()
                self.wfile.write(head)
                while True:
                    self.wfile.write(filler)
            else:
                self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def hostile_http_server(image: bytes, gap_s: float = 2.0, shard: bytes = b"") -> Iterator[str]:
    """`/trickle.png`: `image` one byte every `gap_s`; `/endless.png` and `/endless.csv`: bodies without end.

    As an S3 endpoint, `s3:/` + DROPPED_SHARD is `shard` whose connection drops halfway through.
    """
    handler = type("Hostile", (_Hostile,), {"image": image, "gap_s": gap_s, "shard": shard})
    with local_http_server(handler) as url:
        yield url


def scene(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """An RGB picture with regions of several colours, so a rotation or a lost channel changes it."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = (30, 60, 200)
    pixels[size[1] // 6 : size[1] * 2 // 3, size[0] // 20 : size[0] // 2] = (250, 200, 20)
    pixels[: size[1] // 2, size[0] // 2 :] = (20, 180, 60)
    return Image.fromarray(pixels)


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    """`image` stored on its side with EXIF orientation 6, which tells a viewer to turn it back upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encoded(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def gray16_scene_png(image: Image.Image) -> bytes:
    """`image` in 16-bit grayscale, every sample using the whole 16-bit range."""
    return encoded(Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257), "PNG")


def half_transparent_png(image: Image.Image) -> bytes:
    """`image` with its left half fully transparent: on white, not on black, it matches the ingested one."""
    rgba = image.convert("RGBA")
    alpha = np.full((image.height, image.width), 255, dtype=np.uint8)
    alpha[:, : image.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return encoded(rgba, "PNG")


def flat_png(side: int, colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    """A valid RGB PNG of side x side pixels of one colour: tiny to send, side x side x 3 bytes to decode."""
    return encoded(Image.new("RGB", (side, side), colour), "PNG")


def flat_jpeg(size: tuple[int, int], colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    """A JPEG photo's size in pixels, of one colour, so it stays small to send."""
    return encoded(Image.new("RGB", size, colour), "JPEG", quality=90)
