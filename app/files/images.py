"""Metadata removal and thumbnails for uploaded PNG, JPEG, GIF and WebP images.

These functions are CPU-bound and block, so async callers run them in a thread. Every failure
to read an image, including a decompression bomb, raises ImageError with a message that is
safe to show the uploader. The pixel size is checked from the header before any pixel is
decoded.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from PIL import (
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

from app.files.sniff import normalize_content_type, sniff_content_type

# The largest image, in pixels, that is decoded. For an animation the limit applies to the sum
# over all frames. Pillow's own limit (Image.MAX_IMAGE_PIXELS, 89,478,485 by default in Pillow
# 12.3) is higher, so `_open` rejects a large image before Pillow would warn about it.
MAX_PIXELS = 40_000_000
JPEG_QUALITY = 90
WEBP_QUALITY = 90
DEFAULT_THUMBNAIL_SIDE = 256

_PILLOW_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
}
_FORMAT_LABELS = {"PNG": "PNG", "JPEG": "JPEG", "GIF": "GIF", "WEBP": "WebP"}

# The plugin classes that Image.open would pick for each format. Calling them directly skips
# Image.open's decompression bomb check, which runs with Pillow's higher limit, so that
# `_open` can report the size against MAX_PIXELS instead.
_OPENERS: dict[str, Callable[[io.BytesIO], ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.jpeg_factory,
    "GIF": GifImagePlugin.GifImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}

# Exceptions that Pillow raises for bytes it cannot decode: OSError for truncated data and
# decoder failures, SyntaxError for broken headers, ValueError for chunks over its size limits.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# Modes in which Pillow loads 16-bit grayscale PNG files.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})


class ImageError(Exception):
    """An image that cannot be processed. The message is safe to show to the uploader."""


def strip_metadata(data: bytes, content_type: str) -> bytes:
    """Remove EXIF (GPS included), XMP, IPTC, text chunks and comments from an image.

    The EXIF orientation is applied to the pixels first, so the image still looks the same
    once its Orientation tag is gone. The result keeps the format of `content_type` and its
    ICC profile. Still images are re-encoded: PNG and GIF losslessly, JPEG at JPEG_QUALITY,
    WebP losslessly when the source is lossless, else at WEBP_QUALITY. Animated GIF, PNG and
    WebP keep all frames: each frame is composited as Pillow displays it and re-encoded with its
    duration and the loop count.

    Raises:
        ImageError: the bytes are not a decodable image of `content_type`, the type is not
            PNG, JPEG, GIF or WebP, or the image is larger than MAX_PIXELS.
    """
    image_format = _pillow_format(content_type)
    label = _FORMAT_LABELS[image_format]
    if _PILLOW_FORMATS.get(sniff_content_type(data) or "") != image_format:
        raise ImageError(f"not a decodable {label} image")

    with _decoding(label), _open(data, image_format) as image:
        # JPEG is never treated as animated: the extra pictures of an MPO file (previews,
        # depth maps) are dropped with the rest of the metadata.
        if image_format != "JPEG" and getattr(image, "n_frames", 1) > 1:
            return _strip_animation(image, image_format, data)
        return _strip_still(image, image_format, data)


def make_thumbnail(data: bytes, *, max_side: int = DEFAULT_THUMBNAIL_SIDE) -> tuple[bytes, str]:
    """Scale an image down to fit in a `max_side` square and return its bytes and content type.

    The thumbnail keeps the aspect ratio, has the EXIF orientation applied and is never larger
    than the source. It is a PNG when the source has at least one pixel that is not fully
    opaque, else a JPEG, and it carries no metadata and no ICC profile. An animation gives a
    thumbnail of its first frame.

    Raises:
        ImageError: the bytes are not a decodable PNG, JPEG, GIF or WebP image, or the image is
            larger than MAX_PIXELS.
        ValueError: `max_side` is less than 1.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1: got {max_side}")

    sniffed = sniff_content_type(data)
    image_format = _PILLOW_FORMATS.get(sniffed or "")
    if image_format is None:
        raise ImageError(
            "thumbnails are made only of PNG, JPEG, GIF and WebP images: "
            f"got {sniffed or 'an unknown file type'}"
        )

    with _decoding(_FORMAT_LABELS[image_format]), _open(data, image_format) as image:
        if image_format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale. Pillow picks the scale so that the
            # decoded image is still no smaller than the thumbnail.
            image.draft(image.mode, (max_side, max_side))
        image.load()

        picture, transparent = _to_rgb(image)
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        # The box is a square, so turning after scaling gives the same size and is cheaper.
        picture = ImageOps.exif_transpose(picture)

    picture.info.clear()
    if transparent:
        return _encode(picture, "PNG"), "image/png"
    return _encode(picture, "JPEG", quality=JPEG_QUALITY), "image/jpeg"


def _pillow_format(content_type: str) -> str:
    try:
        normalized = normalize_content_type(content_type)
    except ValueError as error:
        raise ImageError(str(error)) from error

    image_format = _PILLOW_FORMATS.get(normalized)
    if image_format is None:
        raise ImageError(
            f"metadata is removed only from PNG, JPEG, GIF and WebP images: got {normalized}"
        )
    return image_format


@contextmanager
def _decoding(label: str) -> Iterator[None]:
    """Translate Pillow's errors and decompression bomb warnings into ImageError."""
    # Turning the warning into an exception keeps it from reaching the log or a test run
    # with warnings as errors. NOTE: in Python 3.11 warnings.catch_warnings changes the
    # process-wide filters, so when two threads run this at once, one may exit first and
    # remove the filter while the other is still decoding.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except _BOMB_ERRORS as error:
            raise ImageError(
                f"{label} image is too large: at most {MAX_PIXELS} pixels are processed"
            ) from error
        except _DECODE_ERRORS as error:
            raise ImageError(f"not a decodable {label} image") from error


def _open(data: bytes, image_format: str) -> ImageFile.ImageFile:
    """Read the header of `data` and check its size without decoding any pixel."""
    image = _OPENERS[image_format](io.BytesIO(data))
    _check_pixels(image.size)
    return image


def _check_pixels(size: tuple[int, int], *, pixels_before: int = 0) -> int:
    width, height = size
    pixels = pixels_before + width * height
    if pixels > MAX_PIXELS:
        if pixels_before:
            raise ImageError(
                f"animation frames total more than {MAX_PIXELS} pixels; "
                f"at most {MAX_PIXELS} pixels are processed"
            )
        raise ImageError(
            f"image is {width}x{height} pixels; at most {MAX_PIXELS} pixels are processed"
        )
    return pixels


def _strip_still(image: ImageFile.ImageFile, image_format: str, data: bytes) -> bytes:
    image.load()
    display_options = _display_options(image)

    picture = ImageOps.exif_transpose(image)
    # The GIF and JPEG writers read comments and extensions from `info` as well as from the
    # save() options, so `info` is emptied and only display_options are written.
    picture.info.clear()
    return _encode(
        picture, image_format, **display_options, **_quality_options(image_format, data)
    )


def _strip_animation(image: ImageFile.ImageFile, image_format: str, data: bytes) -> bytes:
    image.seek(0)
    loop = image.info.get("loop")
    icc_profile = image.info.get("icc_profile")

    frames: list[Image.Image] = []
    durations: list[int] = []
    pixels = 0
    for index in range(image.n_frames):
        image.seek(index)
        pixels = _check_pixels(image.size, pixels_before=pixels)

        frame = ImageOps.exif_transpose(image).convert("RGBA")
        frame.info.clear()
        frames.append(frame)
        durations.append(int(image.info.get("duration", 0)))

    frames = _pad_to_common_size(frames)
    options: dict[str, Any] = {
        "save_all": True,
        "append_images": frames[1:],
        "duration": durations,
        **_quality_options(image_format, data),
    }
    if loop is not None:
        options["loop"] = loop
    if icc_profile and image_format != "GIF":
        options["icc_profile"] = icc_profile
    if image_format == "GIF":
        # Frames are already composited, so each one replaces the last instead of being
        # drawn over it. NOTE: Pillow quantizes each RGBA frame back to a 256-colour palette,
        # so a frame drawn over frames with other palettes may lose some colours.
        options["disposal"] = 2
    return _encode(frames[0], image_format, **options)


def _pad_to_common_size(frames: list[Image.Image]) -> list[Image.Image]:
    """Extend frames with transparent pixels to the largest size, since GIF frames may grow."""
    width = max(frame.width for frame in frames)
    height = max(frame.height for frame in frames)

    padded = []
    for frame in frames:
        if frame.size != (width, height):
            canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
            canvas.paste(frame, (0, 0))
            frame = canvas
        padded.append(frame)
    return padded


def _display_options(image: Image.Image) -> dict[str, Any]:
    """Select the entries of `info` that affect how the pixels look, as save() options."""
    options: dict[str, Any] = {}
    if image.info.get("icc_profile") and image.format != "GIF":
        options["icc_profile"] = image.info["icc_profile"]
    if "transparency" in image.info and image.format in ("PNG", "GIF"):
        options["transparency"] = image.info["transparency"]
    if "background" in image.info and image.format == "GIF":
        options["background"] = image.info["background"]
    return options


def _quality_options(image_format: str, data: bytes) -> dict[str, Any]:
    if image_format == "JPEG":
        return {"quality": JPEG_QUALITY}
    if image_format == "WEBP":
        if _is_lossless_webp(data):
            return {"lossless": True}
        return {"quality": WEBP_QUALITY}
    return {}


def _is_lossless_webp(data: bytes) -> bool:
    """Tell whether the first picture of a WebP file is VP8L (lossless) rather than VP8 (lossy)."""
    # RIFF chunks: a four-byte type, a little-endian four-byte size, then the payload padded
    # to an even length. An ANMF (animation frame) payload starts with 16 bytes of frame
    # header before its own chunks.
    offset = 12
    while offset + 8 <= len(data):
        chunk_type = data[offset : offset + 4]
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        if chunk_type == b"VP8L":
            return True
        if chunk_type == b"VP8 ":
            return False
        if chunk_type == b"ANMF":
            return data[offset + 24 : offset + 28] == b"VP8L"
        offset += 8 + size + (size & 1)
    return False


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """Convert to RGBA when any pixel is not fully opaque, else to RGB, and tell if it is RGBA."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's conversion to 8 bits clips values above 255 instead of scaling them.
        image = image.convert("I").point(lambda value: value / 256).convert("L")

    if not image.has_transparency_data:
        return image.convert("RGB"), False

    # Palette images with transparency must go through RGBA: Pillow warns on a direct
    # conversion to RGB.
    picture = image.convert("RGBA")
    minimum_alpha, _ = picture.getchannel("A").getextrema()
    if minimum_alpha < 255:
        return picture, True
    return picture.convert("RGB"), False


def _encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    output = io.BytesIO()
    image.save(output, format=image_format, **options)
    return output.getvalue()
