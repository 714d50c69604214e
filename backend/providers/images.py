"""Image inputs of the multimodal embedder: load, validate and resize, as GME's `fetch_image` does.

`ImageLoader.load(source)` accepts a PIL image, raw bytes, a file path (or `file://` path), a base64 string or a
`data:` URI, and an http(s) URL only when `MULTIMODAL_EMBEDDING_ALLOW_IMAGE_URLS=true`. It returns an RGB image,
or raises `InvalidImageError` naming the problem (undecodable, empty or zero-size, over the byte or pixel limit,
unreadable path, URL not allowed or failed). The pixel limit is checked on the header, before the pixels are
decoded, so a decompression bomb never reaches memory.

`fetch_image(image)` then applies the resize of qwen_vl_utils' `fetch_image` (copied into GME's
`gme_inference.py`): RGB, then `smart_resize` to multiples of 28 within 4..16384 image tokens and an aspect ratio
of at most 200. The processor afterwards resizes again within MULTIMODAL_EMBEDDING_MIN/MAX_PIXELS, exactly as the
official pipeline does. Everything here is blocking and CPU-bound: call it from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from backend.errors import InvalidImageError

logger = logging.getLogger(__name__)

# qwen_vl_utils.vision_process constants, as copied into GME's gme_inference.py.
IMAGE_FACTOR = 28
FETCH_MIN_PIXELS = 4 * 28 * 28
FETCH_MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200

_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
_PATH_PROBE_LIMIT = 4096  # longer strings are never probed as file paths (base64 payloads are long)


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = FETCH_MIN_PIXELS,
    max_pixels: int = FETCH_MAX_PIXELS,
) -> tuple[int, int]:
    """qwen_vl_utils' smart_resize: sides rounded to multiples of `factor`, area within [min, max], ratio <= 200.

    Differs from transformers' copy: sides below `factor` are raised to it, and a too-thin image is clipped to
    ratio 200 instead of raising.
    """
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if max(h_bar, w_bar) / min(h_bar, w_bar) > MAX_RATIO:
        logger.warning("image aspect ratio %d:%d clipped to %d", h_bar, w_bar, MAX_RATIO)
        if h_bar > w_bar:
            h_bar = w_bar * MAX_RATIO
        else:
            w_bar = h_bar * MAX_RATIO
    return h_bar, w_bar


def fetch_image(image: Image.Image) -> Image.Image:
    """GME's `fetch_image` on a loaded image: convert to RGB and resize with `smart_resize` (factor 28)."""
    image = image.convert("RGB")
    width, height = image.size
    resized_height, resized_width = smart_resize(height, width)
    return image.resize((resized_width, resized_height))


class ImageLoader:
    """Turns the accepted image inputs into validated PIL images, within the configured limits."""

    def __init__(
        self,
        *,
        max_image_pixels: int,
        max_image_bytes: int,
        allow_urls: bool = False,
        url_timeout: float = 10.0,
    ) -> None:
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.allow_urls = allow_urls
        self.url_timeout = url_timeout
        # PIL refuses images above 2x its own (process-wide) limit on open; never let it be stricter than ours.
        # Our own limit is enforced in `_check_pixels` on the header, before any decoding.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_image_pixels:
            Image.MAX_IMAGE_PIXELS = max_image_pixels

    def load(self, source: Any, index: int = 0) -> Image.Image:
        """The decoded RGB image of `source` (`index` is its position in the request, used in messages)."""
        where = f"image {index}"
        if isinstance(source, Image.Image):
            self._check_pixels(source.size, where)
            return source.convert("RGB")
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self._decode(bytes(source), where)
        if isinstance(source, Path):
            return self._decode(self._read_path(source, where), where)
        if isinstance(source, str):
            return self._decode(self._string_bytes(source, where), where)
        raise InvalidImageError(
            f"{where}: unsupported type {type(source).__name__}; expected a PIL image, bytes, a file path, "
            "a base64 string or a data URI",
            index=index,
        )

    # --- sources -------------------------------------------------------------------------------------------
    def _string_bytes(self, text: str, where: str) -> bytes:
        text = text.strip()
        if not text:
            raise InvalidImageError(f"{where}: the image string is empty")
        lowered = text[:16].lower()
        if lowered.startswith("data:"):
            return self._data_uri(text, where)
        if lowered.startswith(("http://", "https://")):
            return self._fetch_url(text, where)
        if lowered.startswith("file://"):
            return self._read_path(Path(text[7:]), where)
        if len(text) <= _PATH_PROBE_LIMIT and _is_file(text):
            return self._read_path(Path(text), where)
        compact = "".join(text.split())
        if _BASE64.match(compact) and len(compact) >= 8:
            return self._b64decode(compact, where)
        raise InvalidImageError(
            f"{where}: cannot read image file '{text[:200]}': no such file (and not a base64 string or data URI)"
        )

    def _data_uri(self, text: str, where: str) -> bytes:
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header.lower():
            raise InvalidImageError(
                f"{where}: data URI must be 'data:image/<type>;base64,<data>' (got '{header[:80]}')"
            )
        return self._b64decode("".join(payload.split()), where)

    def _b64decode(self, payload: str, where: str) -> bytes:
        if len(payload) * 3 // 4 > self.max_image_bytes + 3:
            raise InvalidImageError(
                f"{where}: about {len(payload) * 3 // 4} bytes exceeds MULTIMODAL_EMBEDDING_MAX_IMAGE_BYTES "
                f"({self.max_image_bytes})"
            )
        try:
            altchars = b"-_" if ("-" in payload or "_" in payload) else None
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=altchars, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidImageError(f"{where}: invalid base64 data: {exc}") from exc
        return data

    def _read_path(self, path: Path, where: str) -> bytes:
        try:
            size = path.stat().st_size
            if size > self.max_image_bytes:
                raise InvalidImageError(
                    f"{where}: file '{path}' has {size} bytes, over MULTIMODAL_EMBEDDING_MAX_IMAGE_BYTES "
                    f"({self.max_image_bytes})"
                )
            return path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"{where}: cannot read image file '{path}': {exc.strerror or exc}") from exc

    def _fetch_url(self, url: str, where: str) -> bytes:
        if not self.allow_urls:
            raise InvalidImageError(
                f"{where}: image URLs are not allowed (MULTIMODAL_EMBEDDING_ALLOW_IMAGE_URLS=false); "
                "send the image as base64 or a data URI"
            )
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.url_timeout, follow_redirects=True) as response:
                if response.status_code != 200:
                    raise InvalidImageError(f"{where}: fetching {url} gave HTTP {response.status_code}")
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > self.max_image_bytes:
                        raise InvalidImageError(
                            f"{where}: {url} is larger than MULTIMODAL_EMBEDDING_MAX_IMAGE_BYTES "
                            f"({self.max_image_bytes})"
                        )
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise InvalidImageError(f"{where}: fetching {url} failed: {exc}") from exc
        return b"".join(chunks)

    # --- decoding ------------------------------------------------------------------------------------------
    def _decode(self, data: bytes, where: str) -> Image.Image:
        if not data:
            raise InvalidImageError(f"{where}: the image is empty (0 bytes)")
        if len(data) > self.max_image_bytes:
            raise InvalidImageError(
                f"{where}: {len(data)} bytes exceeds MULTIMODAL_EMBEDDING_MAX_IMAGE_BYTES ({self.max_image_bytes})"
            )
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as exc:
            raise InvalidImageError(
                f"{where}: {exc}; the limit is MULTIMODAL_EMBEDDING_MAX_IMAGE_PIXELS ({self.max_image_pixels})"
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidImageError(f"{where}: cannot decode the image data ({len(data)} bytes): {exc}") from exc
        self._check_pixels(image.size, where)
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
            raise InvalidImageError(f"{where}: cannot decode the image data ({len(data)} bytes): {exc}") from exc

    def _check_pixels(self, size: tuple[int, int], where: str) -> None:
        width, height = size
        if width <= 0 or height <= 0:
            raise InvalidImageError(f"{where}: the image has zero size ({width}x{height})")
        if width * height > self.max_image_pixels:
            raise InvalidImageError(
                f"{where}: {width}x{height} = {width * height} pixels exceeds MULTIMODAL_EMBEDDING_MAX_IMAGE_PIXELS "
                f"({self.max_image_pixels})"
            )


def _is_file(text: str) -> bool:
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):
        return False
