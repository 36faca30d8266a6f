"""Content types of uploaded bytes, sniffed from their magic numbers and never from a name.

A declared content type is only a claim: callers compare it, after `normalize_content_type`, with
what `sniff_content_type` returns for the bytes, and check the sniffed type against an allow-list.
Text that starts like markup is reported as HTML, SVG or XML so that an allow-list without those
types rejects it, because a browser may run scripts in such a file served from our origin.
"""

from __future__ import annotations

import re

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
PDF_SIGNATURE = b"%PDF-"
UTF8_BOM = b"\xef\xbb\xbf"

# Legacy names that some browsers and cameras still send for standard types.
_CONTENT_TYPE_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
}

# RFC 9110 section 5.6.2: a token is one or more of these characters. The input is lower-cased
# first.
_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
_MEDIA_TYPE_PATTERN = re.compile(rf"{_TOKEN}/{_TOKEN}")

# C0 control characters that plain text never contains: all of 0x00-0x1F except TAB, LF, FF
# and CR. Checking the bytes is enough because UTF-8 never uses bytes below 0x80 inside a
# multi-byte sequence.
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f]")

# Whitespace that HTML parsers skip before the first tag: TAB, LF, FF, CR and space.
_LEADING_WHITESPACE = b"\t\n\x0c\r "

# Markup starts matched as prefixes, lower-case, after leading whitespace. Order matters:
# `<?xml` is checked for an SVG root element separately.
_MARKUP_PREFIXES = (
    (b"<!doctype html", "text/html"),
    (b"<html", "text/html"),
    (b"<script", "text/html"),
    (b"<!doctype svg", "image/svg+xml"),
    (b"<svg", "image/svg+xml"),
    (b"<?xml", "application/xml"),
)

# Further tags that make browsers treat a resource of unknown type as HTML (WHATWG MIME
# Sniffing Standard, "rules for identifying an unknown MIME type"). Unlike the prefixes above,
# each must be followed by whitespace, ">", "/" or the end of the data, so "<a" does not match
# "<about". The standard accepts only a space or ">" there, so this matches more than browsers.
_HTML_TAGS = (
    b"<head",
    b"<iframe",
    b"<h1",
    b"<div",
    b"<font",
    b"<table",
    b"<a",
    b"<style",
    b"<title",
    b"<b",
    b"<body",
    b"<br",
    b"<p",
    b"<!--",
)
_TAG_END_BYTES = b"\t\n\x0c\r />"

# How far into an XML document to look for an SVG root element.
_XML_SVG_SEARCH_BYTES = 1024


def sniff_content_type(data: bytes) -> str | None:
    """Identify the content type of `data` from its bytes, or return None when it is unknown.

    Binary formats are recognized by their full signature, so a truncated header returns None.
    Text is valid UTF-8 (an optional BOM, no NUL and no C0 controls other than TAB, LF, FF and CR)
    with at least one character after the BOM.
    """
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    if data.startswith(JPEG_SIGNATURE):
        return "image/jpeg"
    if data.startswith(GIF_SIGNATURES):
        return "image/gif"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(PDF_SIGNATURE):
        return "application/pdf"

    if not is_text(data):
        return None

    return _sniff_markup(data) or "text/plain"


def is_text(data: bytes) -> bool:
    """Tell whether `data` is non-empty UTF-8 text without binary control characters."""
    body = data.removeprefix(UTF8_BOM)
    if not body:
        return False

    if _BINARY_BYTES.search(body):
        return False

    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _sniff_markup(text: bytes) -> str | None:
    start = text.removeprefix(UTF8_BOM).lstrip(_LEADING_WHITESPACE)[:_XML_SVG_SEARCH_BYTES].lower()

    for prefix, content_type in _MARKUP_PREFIXES:
        if not start.startswith(prefix):
            continue
        if content_type == "application/xml" and b"<svg" in start:
            return "image/svg+xml"
        return content_type

    for tag in _HTML_TAGS:
        if not start.startswith(tag):
            continue
        next_byte = start[len(tag) : len(tag) + 1]
        if not next_byte or next_byte in _TAG_END_BYTES:
            return "text/html"

    return None


def normalize_content_type(value: str) -> str:
    """Return `value` as a lower-case `type/subtype` without parameters, with aliases resolved.

    Raises:
        ValueError: `value` is not `type/subtype` in token characters.
    """
    media_type = value.split(";", 1)[0].strip(" \t").lower()
    if not _MEDIA_TYPE_PATTERN.fullmatch(media_type):
        excerpt = value if len(value) <= 100 else value[:100] + "..."
        raise ValueError(f"content type must be type/subtype, such as image/png: got {excerpt!r}")

    return _CONTENT_TYPE_ALIASES.get(media_type, media_type)
