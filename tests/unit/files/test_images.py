"""Metadata removal and thumbnails of uploaded images."""

from __future__ import annotations

import io
import warnings

import pytest
from PIL import Image, ImageCms, ImageFile

from app.files import images
from app.files.images import MAX_PIXELS, ImageError, make_thumbnail, strip_metadata
from tests.support.files import (
    BACKGROUND_COLOR,
    MARKER_COLOR,
    bomb_gif,
    bomb_png,
    exif_of,
    gif_bytes,
    has_gps,
    jpeg_with_exif,
    pdf_bytes,
    png_bytes,
    png_with_text,
    webp_bytes,
)

# JPEG is lossy, so colours read back from it are compared with this tolerance per channel.
JPEG_TOLERANCE = 24


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rgba_at(data: bytes, position: tuple[int, int], frame: int = 0) -> tuple[int, ...]:
    image = Image.open(io.BytesIO(data))
    image.seek(frame)
    return image.convert("RGBA").getpixel(position)


def is_close(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return all(abs(a - e) <= JPEG_TOLERANCE for a, e in zip(actual, expected, strict=False))


def solid_image(size: tuple[int, int], image_format: str, mode: str = "RGB") -> bytes:
    color = (40, 80, 120, 255) if mode == "RGBA" else (40, 80, 120)
    output = io.BytesIO()
    Image.new(mode, size, color).save(output, format=image_format)
    return output.getvalue()


def webp_chunk_types(data: bytes) -> list[bytes]:
    types = []
    offset = 12
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        types.append(data[offset : offset + 4])
        offset += 8 + size + (size & 1)
    return types


@pytest.fixture
def pixels_never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image is decoded, to show a check happened on the header alone."""

    def fail_on_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_on_load)


# strip_metadata: JPEG


def test_jpeg_exif_and_gps_are_removed() -> None:
    source = jpeg_with_exif()

    stripped = strip_metadata(source, "image/jpeg")

    assert exif_of(source)["Make"] == "Example Camera Co"
    assert has_gps(source)
    assert exif_of(stripped) == {}
    assert not has_gps(stripped)


def test_jpeg_comment_is_removed() -> None:
    stripped = strip_metadata(jpeg_with_exif(), "image/jpeg")

    info = open_image(stripped).info

    assert "comment" not in info
    assert "exif" not in info
    assert b"private comment" not in stripped


def test_jpeg_orientation_is_applied_to_pixels() -> None:
    stripped = strip_metadata(jpeg_with_exif(64, 48, orientation=6), "image/jpeg")

    image = open_image(stripped)

    assert image.format == "JPEG"
    assert image.size == (48, 64)
    # Orientation 6 means the stored image is shown turned 90 degrees clockwise, so the marker
    # stored at the top-left corner is shown at the top-right corner.
    assert is_close(rgba_at(stripped, (47 - 4, 4)), MARKER_COLOR + (255,))
    assert is_close(rgba_at(stripped, (4, 4)), BACKGROUND_COLOR + (255,))


def test_jpeg_without_orientation_keeps_size() -> None:
    stripped = strip_metadata(jpeg_with_exif(64, 48, orientation=1), "image/jpeg")

    assert open_image(stripped).size == (64, 48)
    assert is_close(rgba_at(stripped, (4, 4)), MARKER_COLOR + (255,))


def test_jpeg_icc_profile_is_kept() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    output = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(output, format="JPEG", icc_profile=profile)

    stripped = strip_metadata(output.getvalue(), "image/jpeg")

    assert open_image(stripped).info.get("icc_profile") == profile


def test_declared_type_alias_is_accepted() -> None:
    stripped = strip_metadata(jpeg_with_exif(), "image/JPG; name=x")

    assert open_image(stripped).format == "JPEG"


# strip_metadata: PNG, GIF, WebP


def test_png_text_and_exif_are_removed() -> None:
    source = png_with_text()

    stripped = strip_metadata(source, "image/png")
    image = open_image(stripped)

    assert image.format == "PNG"
    assert "Author" not in image.info
    assert "Comment" not in image.info
    assert exif_of(stripped) == {}
    assert not has_gps(stripped)
    assert b"Jane Example" not in stripped
    assert rgba_at(stripped, (0, 0)) == (10, 20, 30, 255)


def test_png_alpha_is_kept() -> None:
    stripped = strip_metadata(png_bytes(3, 2, alpha=True), "image/png")

    image = open_image(stripped)

    assert image.mode == "RGBA"
    assert image.size == (3, 2)
    assert rgba_at(stripped, (0, 0)) == (0, 128, 255, 128)


def test_gif_comment_is_removed_and_transparency_kept() -> None:
    stripped = strip_metadata(gif_bytes(comment=b"secret note"), "image/gif")

    image = open_image(stripped)

    assert image.format == "GIF"
    assert "comment" not in image.info
    assert b"secret note" not in stripped
    assert rgba_at(stripped, (2, 2)) == (255, 0, 0, 255)
    assert rgba_at(stripped, (12, 2))[3] == 0


def test_animated_gif_keeps_frames() -> None:
    stripped = strip_metadata(gif_bytes(frames=3, comment=b"secret note"), "image/gif")

    image = open_image(stripped)

    assert image.n_frames == 3
    assert "comment" not in image.info
    assert image.info.get("loop") == 0
    assert image.info.get("duration") == 100
    assert rgba_at(stripped, (2, 2), frame=0) == (255, 0, 0, 255)
    assert rgba_at(stripped, (2, 2), frame=1) == (0, 255, 0, 255)
    assert rgba_at(stripped, (12, 2), frame=1)[3] == 0


def test_webp_exif_is_removed() -> None:
    source = webp_bytes(exif=True)

    stripped = strip_metadata(source, "image/webp")

    assert has_gps(source)
    assert exif_of(stripped) == {}
    assert not has_gps(stripped)
    assert b"EXIF" not in webp_chunk_types(stripped)


@pytest.mark.parametrize(("lossless", "picture_chunk"), [(True, b"VP8L"), (False, b"VP8 ")])
def test_webp_compression_is_kept(lossless: bool, picture_chunk: bytes) -> None:
    stripped = strip_metadata(webp_bytes(lossless=lossless, exif=True), "image/webp")

    assert picture_chunk in webp_chunk_types(stripped)


def test_animated_webp_keeps_frames() -> None:
    stripped = strip_metadata(webp_bytes(frames=2, exif=True), "image/webp")

    image = open_image(stripped)

    assert image.n_frames == 2
    assert exif_of(stripped) == {}
    assert rgba_at(stripped, (0, 0), frame=1) == (200, 0, 0, 255)


def test_animation_over_pixel_limit_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each 16x8 frame fits under the limit but three of them do not.
    monkeypatch.setattr(images, "MAX_PIXELS", 16 * 8 * 2)

    with pytest.raises(ImageError, match="animation frames total more than 256 pixels"):
        strip_metadata(gif_bytes(frames=3), "image/gif")


# strip_metadata: rejected input


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        (png_bytes(), "image/jpeg", "not a decodable JPEG image"),
        (b"just text", "image/png", "not a decodable PNG image"),
        (
            pdf_bytes(),
            "application/pdf",
            "only from PNG, JPEG, GIF and WebP images: got application/pdf",
        ),
        (png_bytes(), "not a type", "content type must be type/subtype"),
    ],
    ids=["mismatch", "text-as-png", "pdf", "invalid-type"],
)
def test_strip_rejects_other_input(data: bytes, content_type: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        strip_metadata(data, content_type)


# make_thumbnail


@pytest.mark.parametrize(
    ("source", "max_side", "size", "content_type"),
    [
        (solid_image((1000, 500), "PNG"), 256, (256, 128), "image/jpeg"),
        (solid_image((512, 1024), "JPEG"), 256, (128, 256), "image/jpeg"),
        (solid_image((10, 6), "PNG"), 256, (10, 6), "image/jpeg"),
        (solid_image((300, 300), "WEBP"), 100, (100, 100), "image/jpeg"),
        (solid_image((300, 200), "PNG", mode="RGBA"), 30, (30, 20), "image/jpeg"),
        (png_bytes(40, 20, alpha=True), 10, (10, 5), "image/png"),
        (gif_bytes(), 8, (8, 4), "image/png"),
        (png_bytes(), 256, (1, 1), "image/jpeg"),
    ],
    ids=[
        "wide-png",
        "tall-jpeg",
        "small-not-upscaled",
        "webp",
        "opaque-rgba",
        "transparent-png",
        "transparent-gif",
        "one-pixel",
    ],
)
def test_thumbnail_size_and_type(
    source: bytes, max_side: int, size: tuple[int, int], content_type: str
) -> None:
    thumbnail, thumbnail_type = make_thumbnail(source, max_side=max_side)

    image = open_image(thumbnail)

    assert thumbnail_type == content_type
    assert Image.MIME[image.format] == content_type
    assert image.size == size


def test_thumbnail_applies_orientation() -> None:
    thumbnail, content_type = make_thumbnail(jpeg_with_exif(64, 48, orientation=6), max_side=32)

    assert content_type == "image/jpeg"
    assert open_image(thumbnail).size == (24, 32)
    assert is_close(rgba_at(thumbnail, (24 - 3, 2)), MARKER_COLOR + (255,))


def test_thumbnail_has_no_metadata() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = io.BytesIO()
    open_image(jpeg_with_exif()).save(
        source, format="JPEG", exif=open_image(jpeg_with_exif()).getexif(), icc_profile=profile
    )

    thumbnail, _ = make_thumbnail(source.getvalue(), max_side=32)

    info = open_image(thumbnail).info

    assert exif_of(thumbnail) == {}
    assert not has_gps(thumbnail)
    assert "comment" not in info
    assert "icc_profile" not in info


def test_thumbnail_of_animation_is_first_frame() -> None:
    thumbnail, content_type = make_thumbnail(gif_bytes(frames=3))

    image = open_image(thumbnail)

    assert content_type == "image/png"
    assert getattr(image, "n_frames", 1) == 1
    assert rgba_at(thumbnail, (2, 2)) == (255, 0, 0, 255)


def test_thumbnail_side_below_one_raises() -> None:
    with pytest.raises(ValueError, match="max_side must be at least 1: got 0"):
        make_thumbnail(png_bytes(), max_side=0)


# Corrupt, truncated and unsupported input


def truncated_jpeg() -> bytes:
    data = solid_image((64, 64), "JPEG")
    return data[: len(data) - 200]


def png_cut_in_pixels() -> bytes:
    # Noise does not compress, so half of the file ends inside the IDAT data.
    output = io.BytesIO()
    Image.effect_noise((64, 64), 64).save(output, format="PNG")
    data = output.getvalue()
    return data[: len(data) // 2]


CORRUPT_IMAGES = [
    (png_bytes(10, 10)[:40], "image/png"),
    (png_cut_in_pixels(), "image/png"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png"),
    (truncated_jpeg(), "image/jpeg"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "image/jpeg"),
    (gif_bytes()[:20], "image/gif"),
    (b"GIF89a", "image/gif"),
    (webp_bytes()[:20], "image/webp"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8L\x00\x00\x00\x00", "image/webp"),
]
CORRUPT_IDS = [
    "png-header-only",
    "png-cut-in-pixels",
    "png-zero-chunks",
    "jpeg-truncated-scan",
    "jpeg-empty-segment",
    "gif-truncated",
    "gif-signature-only",
    "webp-truncated",
    "webp-empty-picture",
]


@pytest.mark.parametrize(("data", "content_type"), CORRUPT_IMAGES, ids=CORRUPT_IDS)
def test_strip_of_corrupt_image_raises(data: bytes, content_type: str) -> None:
    with pytest.raises(ImageError, match="not a decodable"):
        strip_metadata(data, content_type)


@pytest.mark.parametrize(("data", "content_type"), CORRUPT_IMAGES, ids=CORRUPT_IDS)
def test_thumbnail_of_corrupt_image_raises(data: bytes, content_type: str) -> None:
    with pytest.raises(ImageError, match="not a decodable"):
        make_thumbnail(data)


@pytest.mark.parametrize(
    ("data", "shown_type"),
    [
        (pdf_bytes(), "application/pdf"),
        (b"plain text", "text/plain"),
        (b"", "an unknown file type"),
        (b"\x00\x01\x02\x03", "an unknown file type"),
    ],
    ids=["pdf", "text", "empty", "binary"],
)
def test_thumbnail_of_unsupported_type_raises(data: bytes, shown_type: str) -> None:
    with pytest.raises(ImageError, match=f"got {shown_type}"):
        make_thumbnail(data)


# Decompression bombs: 8000x8000 is over MAX_PIXELS only, 10000x10000 is also over Pillow's
# warning limit and 20000x20000 over its error limit (about 89 and 179 million pixels).

BOMBS = [
    (bomb_png(8000, 8000), "image/png", "image is 8000x8000 pixels"),
    (bomb_png(10000, 10000), "image/png", "image is 10000x10000 pixels"),
    (bomb_png(20000, 20000), "image/png", "image is 20000x20000 pixels"),
    (bomb_png(2**31 - 1, 2**31 - 1), "image/png", "image is 2147483647x2147483647 pixels"),
    (bomb_gif(8000, 8000), "image/gif", "image is 8000x8000 pixels"),
    (bomb_gif(10000, 10000), "image/gif", "GIF image is too large"),
    (bomb_gif(20000, 20000), "image/gif", "GIF image is too large"),
]
BOMB_IDS = ["png-8000", "png-10000", "png-20000", "png-max", "gif-8000", "gif-10000", "gif-20000"]


@pytest.mark.parametrize(("data", "content_type", "message"), BOMBS, ids=BOMB_IDS)
@pytest.mark.usefixtures("pixels_never_decoded")
def test_strip_of_bomb_raises_before_decoding(data: bytes, content_type: str, message: str) -> None:
    assert len(data) < 100

    with pytest.raises(ImageError, match=message) as raised:
        strip_metadata(data, content_type)

    assert f"at most {MAX_PIXELS} pixels are processed" in str(raised.value)


@pytest.mark.parametrize(("data", "content_type", "message"), BOMBS, ids=BOMB_IDS)
@pytest.mark.usefixtures("pixels_never_decoded")
def test_thumbnail_of_bomb_raises_before_decoding(
    data: bytes, content_type: str, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        make_thumbnail(data)


@pytest.mark.parametrize(
    "data", [bomb_png(10000, 10000), bomb_gif(10000, 10000)], ids=["png", "gif"]
)
def test_bomb_emits_no_warning(data: bytes) -> None:
    # The "always" filter imitates a production process, where an escaped
    # DecompressionBombWarning would be printed instead of raised.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError):
            make_thumbnail(data)

    assert [str(warning.message) for warning in caught] == []


def test_image_at_pixel_limit_is_processed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 20 * 10)

    thumbnail, _ = make_thumbnail(solid_image((20, 10), "PNG"))

    assert open_image(thumbnail).size == (20, 10)
