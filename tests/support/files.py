"""Bytes of real files for the files domain tests, made with Pillow so no binary is committed."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import ExifTags, Image, PngImagePlugin

# The colour of the marker block that `jpeg_with_exif` paints in the top-left corner of the
# stored pixels, so tests can see where orientation moved it.
MARKER_COLOR = (255, 0, 0)
BACKGROUND_COLOR = (0, 0, 255)
MARKER_SIZE = 16

# GPS position written by `jpeg_with_exif`: degrees, minutes, seconds.
GPS_LATITUDE = (52.0, 31.0, 12.0)
GPS_LONGITUDE = (13.0, 24.0, 36.0)


def png_bytes(width: int = 1, height: int = 1, *, alpha: bool = False) -> bytes:
    """Encode a PNG of one colour, half transparent when `alpha` is true."""
    if alpha:
        image = Image.new("RGBA", (width, height), (0, 128, 255, 128))
    else:
        image = Image.new("RGB", (width, height), (0, 128, 255))
    return _encode(image, "PNG")


def png_with_text(width: int = 8, height: int = 8) -> bytes:
    """Encode a PNG with tEXt, iTXt and eXIf chunks that carry an author, a comment and GPS."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Example")
    info.add_itxt("Comment", "taken at home", lang="en")
    image = Image.new("RGB", (width, height), (10, 20, 30))
    return _encode(image, "PNG", pnginfo=info, exif=_camera_exif(orientation=1, gps=True))


def jpeg_with_exif(
    width: int = 64, height: int = 48, *, orientation: int = 6, gps: bool = True
) -> bytes:
    """Encode a JPEG with EXIF Make, Model, Orientation and, when `gps` is true, a GPS position.

    The stored pixels are BACKGROUND_COLOR with a MARKER_COLOR block of MARKER_SIZE pixels in
    the top-left corner, plus a COM comment segment.
    """
    image = Image.new("RGB", (width, height), BACKGROUND_COLOR)
    image.paste(MARKER_COLOR, (0, 0, MARKER_SIZE, MARKER_SIZE))
    exif = _camera_exif(orientation=orientation, gps=gps)
    return _encode(image, "JPEG", quality=95, exif=exif, comment=b"private comment")


def gif_bytes(*, frames: int = 1, comment: bytes | None = None) -> bytes:
    """Encode a 16x8 GIF whose right half is transparent, animated when `frames` > 1.

    The left half is red in even frames and green in odd ones.
    """
    images = []
    for index in range(frames):
        image = Image.new("P", (16, 8), 0)
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        image.paste(1 + index % 2, (0, 0, 8, 8))
        images.append(image)

    options: dict[str, object] = {"transparency": 0, "duration": 100, "loop": 0}
    if comment is not None:
        options["comment"] = comment
    if frames > 1:
        options["save_all"] = True
        options["append_images"] = images[1:]
    return _encode(images[0], "GIF", **options)


def webp_bytes(*, lossless: bool = True, exif: bool = False, frames: int = 1) -> bytes:
    """Encode a 16x8 WebP, with the EXIF of `jpeg_with_exif` when `exif` is true."""
    images = [
        Image.new("RGB", (16, 8), (0, 200, 0) if index % 2 == 0 else (200, 0, 0))
        for index in range(frames)
    ]

    options: dict[str, object] = {"lossless": lossless}
    if exif:
        options["exif"] = _camera_exif(orientation=1, gps=True)
    if frames > 1:
        options.update(save_all=True, append_images=images[1:], duration=100, loop=0)
    return _encode(images[0], "WEBP", **options)


def pdf_bytes() -> bytes:
    """Return a minimal PDF: one empty page, a cross-reference table and a trailer."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    ]
    body = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, content in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n%s\nendobj\n" % (number, content)

    xref_offset = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        body += b"%010d 00000 n \n" % offset
    body += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_offset,
    )
    return bytes(body)


def bomb_png(width: int, height: int) -> bytes:
    """Build a PNG of a few dozen bytes whose IHDR claims `width` x `height` RGB pixels.

    The IDAT chunk contains an empty zlib stream, so the file is cheap to make and any attempt
    to decode its pixels fails after the header has been read.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def bomb_gif(width: int, height: int) -> bytes:
    """Build a GIF whose logical screen is 1x1 but whose only frame claims `width` x `height`.

    Pillow grows the canvas to the frame while reading the frame header, which is where its
    own decompression bomb check runs. The frame data contains only the LZW clear and end
    codes, so it has no pixels.
    """
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    # Minimum code size 2, then one sub-block with the clear and end codes (4 and 5).
    pixels = b"\x02\x01\x2c\x00"
    return screen + frame + pixels + b"\x3b"


def exif_of(data: bytes) -> dict[str, object]:
    """Decode the base EXIF tags of an image, keyed by tag name (`Make`, `Orientation`...)."""
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
    return {ExifTags.TAGS.get(tag, str(tag)): value for tag, value in exif.items()}


def has_gps(data: bytes) -> bool:
    """Tell whether the EXIF of an image contains a GPS IFD with at least one tag."""
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
    return ExifTags.IFD.GPSInfo in exif and bool(exif.get_ifd(ExifTags.IFD.GPSInfo))


def _camera_exif(*, orientation: int, gps: bool) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Example Camera Co"
    exif[ExifTags.Base.Model] = "Model 7"
    exif[ExifTags.Base.Orientation] = orientation
    if gps:
        exif[ExifTags.IFD.GPSInfo] = {
            ExifTags.GPS.GPSLatitudeRef: "N",
            ExifTags.GPS.GPSLatitude: GPS_LATITUDE,
            ExifTags.GPS.GPSLongitudeRef: "E",
            ExifTags.GPS.GPSLongitude: GPS_LONGITUDE,
        }
    return exif


def _png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    checksum = zlib.crc32(chunk_type + payload)
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", checksum)


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    output = io.BytesIO()
    image.save(output, format=image_format, **options)
    return output.getvalue()
