"""Image loading and validation of the multimodal embedder (backend/providers/images.py)."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from backend.errors import InvalidImageError
from backend.providers.images import ImageLoader, fetch_image, smart_resize


def png_bytes(size: tuple[int, int] = (60, 45), mode: str = "RGB", color: object = (200, 30, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (what a decompression bomb looks like)."""
    data = bytearray(png_bytes((1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def loader(**overrides: object) -> ImageLoader:
    options: dict = {"max_image_pixels": 1_000_000, "max_image_bytes": 1_000_000, "allow_urls": False}
    options.update(overrides)
    return ImageLoader(**options)


# --- accepted inputs ---------------------------------------------------------------------------------------
def test_every_accepted_source_gives_the_same_rgb_image(tmp_path: Path) -> None:
    data = png_bytes()
    path = tmp_path / "red.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [data, bytearray(data), path, str(path), f"file://{path}", b64, f"data:image/png;base64,{b64}",
               Image.open(io.BytesIO(data))]
    images = [loader().load(source) for source in sources]
    for image in images:
        assert image.mode == "RGB" and image.size == (60, 45)
        assert image.getpixel((3, 3)) == (200, 30, 10)


def test_rgba_and_palette_images_are_converted_to_rgb() -> None:
    assert loader().load(png_bytes(mode="RGBA", color=(1, 2, 3, 4))).mode == "RGB"
    assert loader().load(Image.new("P", (30, 30))).mode == "RGB"
    assert loader().load(Image.new("L", (30, 30), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_urlsafe_and_unpadded_base64_are_accepted() -> None:
    data = png_bytes((33, 31))
    encoded = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert loader().load(encoded).size == (33, 31)


# --- refused inputs: each names its problem ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (b"this is not an image at all", "cannot decode"),
        (b"", "empty"),
        ("", "empty"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png,rawdata", "data URI"),
        ("data:image/png;base64,@@@notbase64@@@", "invalid base64"),
        (Image.new("RGB", (0, 0)), "zero size"),
        (Image.new("RGB", (5, 0)), "zero size"),
        (12345, "unsupported type"),
    ],
)
def test_bad_image_inputs_raise_invalid_image_error(source: object, needle: str) -> None:
    with pytest.raises(InvalidImageError, match=needle):
        loader().load(source)


def test_truncated_image_data_is_refused() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(buffer, format="JPEG")
    with pytest.raises(InvalidImageError, match="cannot decode"):
        loader().load(buffer.getvalue()[:300])


def test_over_the_byte_limit_is_refused_for_every_source(tmp_path: Path) -> None:
    data = png_bytes((300, 300), color=None)  # uncompressible enough: > 200 bytes
    small = loader(max_image_bytes=200)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for source in (data, base64.b64encode(data).decode(), path):
        with pytest.raises(InvalidImageError, match=r"MAX_IMAGE_BYTES \(200\)"):
            small.load(source)


def test_over_the_pixel_limit_is_refused_before_the_pixels_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_bytes((2000, 1000))  # a solid colour: a small file, 2 M pixels
    decoded: list[int] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        decoded.append(1)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(InvalidImageError, match=r"2000x1000 = 2000000 pixels exceeds .*MAX_IMAGE_PIXELS \(1000000\)"):
        loader().load(data)
    assert decoded == []
    assert loader(max_image_pixels=2_000_000).load(data).size == (2000, 1000)


def test_pil_image_over_the_pixel_limit_is_refused() -> None:
    with pytest.raises(InvalidImageError, match="MAX_IMAGE_PIXELS"):
        loader(max_image_pixels=100).load(Image.new("RGB", (20, 20)))


@pytest.mark.parametrize("side", [5_000, 100_000])
def test_decompression_bomb_header_is_refused(side: int) -> None:
    # 5k^2 = 25 M px is refused by our header check; 100k^2 = 1e10 px already by PIL's own bomb guard on open.
    bomb = png_with_declared_size(side, side)
    assert len(bomb) < 200
    with pytest.raises(InvalidImageError, match="MAX_IMAGE_PIXELS"):
        loader().load(bomb)


def test_unreadable_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="cannot read image file .*missing.png"):
        loader().load(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="cannot read image file .*missing.png"):
        loader().load(str(tmp_path / "missing.png"))
    with pytest.raises(InvalidImageError, match="cannot read image file"):
        loader().load(tmp_path)  # a directory


def test_urls_are_refused_unless_allowed() -> None:
    for url in ("http://127.0.0.1:9/x.png", "https://example.invalid/x.png"):
        with pytest.raises(InvalidImageError, match="ALLOW_IMAGE_URLS=false"):
            loader().load(url)


@pytest.fixture
def image_server() -> Iterator[str]:
    body = png_bytes((50, 40))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_allowed_urls_are_fetched_with_the_byte_cap(image_server: str) -> None:
    assert loader(allow_urls=True).load(f"{image_server}/img.png").size == (50, 40)
    with pytest.raises(InvalidImageError, match="HTTP 404"):
        loader(allow_urls=True).load(f"{image_server}/nothing.png")
    with pytest.raises(InvalidImageError, match=r"larger than MULTIMODAL_EMBEDDING_MAX_IMAGE_BYTES \(50\)"):
        loader(allow_urls=True, max_image_bytes=50).load(f"{image_server}/img.png")
    with pytest.raises(InvalidImageError, match="failed"):
        loader(allow_urls=True, url_timeout=2).load("http://127.0.0.1:9/unreachable.png")


# --- resizing (qwen_vl_utils' fetch_image) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (45, 60, (56, 56)),  # rounded to multiples of 28
        (10, 10, (56, 56)),  # tiny images are scaled up to the 4-token minimum
        (1000, 1000, (1008, 1008)),
        (20, 10_000, (28, 5600)),  # aspect ratio clipped to 200
        (30_000, 20_000, (4368, 2912)),  # above 16384 tokens: scaled down (floor to the factor)
    ],
)
def test_smart_resize_follows_qwen_vl_utils(height: int, width: int, expected: tuple[int, int]) -> None:
    assert smart_resize(height, width) == expected


def test_fetch_image_gives_rgb_at_multiples_of_28() -> None:
    image = fetch_image(Image.new("RGBA", (61, 45)))
    assert image.mode == "RGB" and image.size == (56, 56)
