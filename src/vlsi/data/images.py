"""The one image loader: every image vlsi reads (training, the data check and length scan, the teacher's answers,
`vlsi eval`, `vlsi explain`) is read here, as an image viewer shows it.

    load_image(source) -> RGB PIL image          source: a file path or the bytes of an image file
    image_header(source) -> (width, height)      from the header only (no pixels decoded), as load_image sizes it

What "as a viewer shows it" means, each a silent change a plain `Image.open(...).convert("RGB")` makes:
- EXIF orientation is applied (phone cameras store portraits sideways with an orientation tag); the header's size
  is swapped for the tags that turn the picture by 90 degrees. The tag is read where the header holds it (a PNG
  whose EXIF chunk follows the pixels is shown as stored, by both functions alike).
- High bit depth is scaled to 8 bits, never clipped: 16-bit images (modes I;16*) by 255/65535; 32-bit integer
  images (mode I) by the range their values use (8-bit values kept, 16-bit values scaled as 16-bit, anything wider
  by its own maximum); float images (mode F) as 0-1 intensities when their values lie in [0, 1], else by their
  own minimum and maximum.
- Transparency is composited onto white, as transformers' `convert_to_rgb` does for every image processor that
  converts to RGB (a plain conversion keeps the stored colour under the alpha, usually black).
- An image of several frames (animated GIF / WebP / PNG, multi-page TIFF) is refused: which frame the user means
  is unknown. Save the frame you mean as its own image.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

ImageSource = Path | bytes
# EXIF orientation -> the transpose that shows the picture upright (as `ImageOps.exif_transpose`); 5-8 turn it by
# 90 or 270 degrees, so width and height swap.
TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
TRANSPOSED = {5, 6, 7, 8}
ORIENTATION = 0x0112


class UnusableImage(ValueError):
    """An image that decodes but cannot be used as given (several frames)."""


def load_image(source: ImageSource) -> Image.Image:
    """The image as an 8-bit RGB picture, oriented, scaled and composited as described in the module docstring.
    Raises OSError / SyntaxError / Image.DecompressionBombError for bytes PIL cannot decode, UnusableImage for an
    image of several frames."""
    with _open(source) as image:
        _refuse_frames(image)
        turn = TURNS.get(_orientation(image))
        image.load()
        image = image.transpose(turn) if turn is not None else image
        return _to_rgb(_to_8_bits(image))


def image_header(source: ImageSource) -> tuple[int, int]:
    """(width, height) of the picture `load_image` gives, read from the header (EXIF orientation included); raises as
    `load_image` does for an unreadable header or an image of several frames."""
    with _open(source) as image:
        _refuse_frames(image)
        width, height = image.size
        orientation = _orientation(image)
    return (height, width) if orientation in TRANSPOSED else (width, height)


def image_identity(source: ImageSource) -> list:
    """What a fingerprint records of an image: a file's path, size and modification time, or the sha256 of bytes."""
    if isinstance(source, bytes):
        return ["sha256", hashlib.sha256(source).hexdigest()]
    stat = Path(source).stat()
    return [str(source), stat.st_size, stat.st_mtime_ns]


def describe(source: ImageSource) -> str:
    """How messages name an image: its path, or its size for embedded bytes."""
    return f"<{len(source)} embedded bytes>" if isinstance(source, bytes) else str(source)


def _open(source: ImageSource) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, from what the header holds (JPEG's APP1, PNG's and WebP's EXIF chunk when it comes
    before the pixels, TIFF's tags): `Image.getexif` would decode a PNG's pixels to look for a later chunk."""
    if "exif" in image.info:
        exif = Image.Exif()
        exif.load(image.info["exif"])
        return exif.get(ORIENTATION)
    return image.getexif().get(ORIENTATION) if image.format in ("TIFF", "MPO") else None


def _refuse_frames(image: Image.Image) -> None:
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise UnusableImage(
            f"{frames} frames ({image.format} animation or multi-page file); save the frame you mean as its own image"
        )


def _to_8_bits(image: Image.Image) -> Image.Image:
    """Modes wider than 8 bits per channel -> mode L, scaled as the module docstring says; other modes unchanged."""
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64) * (255 / 65535)
    elif image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        if low < 0 or high > 65535:
            pixels = _stretch(pixels)
        elif high > 255:
            pixels = pixels * (255 / 65535)
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        finite = pixels[np.isfinite(pixels)]
        in_unit = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
        pixels = np.nan_to_num(pixels) * 255 if in_unit else _stretch(np.nan_to_num(pixels))
    else:
        return image
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _stretch(pixels: np.ndarray) -> np.ndarray:
    low, high = pixels.min(), pixels.max()
    return (pixels - low) * (255 / (high - low)) if high > low else np.zeros_like(pixels)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (transformers' `convert_to_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")
