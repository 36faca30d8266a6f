"""Content types sniffed from bytes and normalized declared types."""

from __future__ import annotations

import pytest

from app.files.sniff import normalize_content_type, sniff_content_type
from tests.support.files import (
    gif_bytes,
    jpeg_with_exif,
    pdf_bytes,
    png_bytes,
    webp_bytes,
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (png_bytes(), "image/png"),
        (png_bytes(alpha=True), "image/png"),
        (jpeg_with_exif(), "image/jpeg"),
        (gif_bytes(), "image/gif"),
        (b"GIF87a" + b"\x00" * 10, "image/gif"),
        (webp_bytes(), "image/webp"),
        (webp_bytes(lossless=False), "image/webp"),
        (pdf_bytes(), "application/pdf"),
    ],
    ids=["png", "png-alpha", "jpeg", "gif89a", "gif87a", "webp-lossless", "webp-lossy", "pdf"],
)
def test_binary_type_is_sniffed(data: bytes, expected: str) -> None:
    assert sniff_content_type(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG",
        b"\x89PNG\r\n\x1a",
        b"\xff\xd8",
        b"RIFF\x00\x00\x00\x00WEB",
        b"RIFF\x00\x00\x00\x00WAVE",
    ],
    ids=["png-4", "png-7", "jpeg-2", "webp-11", "riff-wave"],
)
def test_truncated_signature_is_unknown(data: bytes) -> None:
    assert sniff_content_type(data) is None


@pytest.mark.parametrize("data", [b"GIF8", b"GIF89", b"%PDF", b"RIFF"])
def test_truncated_text_signature_is_plain_text(data: bytes) -> None:
    # These prefixes are printable ASCII, so without the full signature they are just text.
    assert sniff_content_type(data) == "text/plain"


@pytest.mark.parametrize(
    "data",
    [
        b"hello, world\n",
        "caf\u00e9 \u65e5\u672c\n".encode(),
        b"\xef\xbb\xbfwith a byte order mark",
        b"tab\tform feed\x0ccarriage return\r\nline feed\n",
        b"a",
        b"<pre>not a tag that browsers sniff</pre>",
        b"<bold",
        b"1 < 2 and 3 > 2",
        b"text mentioning <html> later on",
    ],
    ids=[
        "ascii",
        "utf8",
        "bom",
        "allowed-controls",
        "one-byte",
        "pre",
        "bold",
        "comparison",
        "html-later",
    ],
)
def test_plain_text_is_sniffed(data: bytes) -> None:
    assert sniff_content_type(data) == "text/plain"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xef\xbb\xbf",
        b"text with a \x00 NUL",
        b"bell \x07",
        b"escape \x1b[31m",
        b"vertical tab \x0b",
        b"\xff\xfeh\x00i\x00",
        b"invalid \xc3\x28 sequence",
        b"cut multi-byte \xe6\x97",
        b"overlong \xc0\xaf",
    ],
    ids=[
        "empty",
        "bom-only",
        "nul",
        "bell",
        "escape",
        "vertical-tab",
        "utf16",
        "invalid-utf8",
        "truncated-utf8",
        "overlong-utf8",
    ],
)
def test_binary_or_empty_data_is_unknown(data: bytes) -> None:
    assert sniff_content_type(data) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"<!DOCTYPE html><html></html>", "text/html"),
        (b"  \n\t<HTML><body>hi</body></HTML>", "text/html"),
        (b"<script>alert(1)</script>", "text/html"),
        (b"\xef\xbb\xbf<html>", "text/html"),
        (b"<body onload=alert(1)>", "text/html"),
        (b"<iframe src=x>", "text/html"),
        (b"<!-- comment -->", "text/html"),
        (b"<a href=x>link</a>", "text/html"),
        (b"<b", "text/html"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>', "image/svg+xml"),
        (b"\r\n<SVG>", "image/svg+xml"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
        (b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x">', "image/svg+xml"),
        (b'<?xml version="1.0"?><note>hi</note>', "application/xml"),
    ],
    ids=[
        "doctype",
        "html-after-whitespace",
        "script",
        "html-after-bom",
        "body",
        "iframe",
        "comment",
        "anchor",
        "b-at-end",
        "svg",
        "svg-upper-case",
        "svg-in-xml",
        "svg-doctype",
        "xml",
    ],
)
def test_markup_in_text_is_not_plain_text(data: bytes, expected: str) -> None:
    assert sniff_content_type(data) == expected


def test_text_declared_as_png_is_sniffed_as_text() -> None:
    declared = normalize_content_type("image/png")

    sniffed = sniff_content_type(b"this is not an image\n")

    assert declared == "image/png"
    assert sniffed == "text/plain"


def test_signature_after_other_bytes_is_unknown() -> None:
    # A signature counts only at the start, and the PNG signature is not text.
    data = b"hello " + png_bytes()[:8]

    assert sniff_content_type(data) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("image/png", "image/png"),
        ("image/PNG; charset=x", "image/png"),
        ("  Text/Plain ; charset=utf-8", "text/plain"),
        ("image/jpg", "image/jpeg"),
        ("image/pjpeg", "image/jpeg"),
        ("IMAGE/JPG", "image/jpeg"),
        ("image/x-png", "image/png"),
        ("application/vnd.ms-excel", "application/vnd.ms-excel"),
        ("image/svg+xml", "image/svg+xml"),
    ],
)
def test_content_type_is_normalized(value: str, expected: str) -> None:
    assert normalize_content_type(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "png",
        "image/",
        "/png",
        "image/png/x",
        "image png",
        "image/p ng",
        "image/pn\u00e9g",
        "; charset=x",
        "image/(png)",
    ],
)
def test_invalid_content_type_raises(value: str) -> None:
    with pytest.raises(ValueError, match="content type must be type/subtype"):
        normalize_content_type(value)


def test_invalid_content_type_message_is_shortened() -> None:
    with pytest.raises(ValueError) as raised:
        normalize_content_type("x" * 500)

    assert len(str(raised.value)) < 200
