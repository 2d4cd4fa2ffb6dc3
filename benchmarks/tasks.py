"""Readers of the raw file formats the offline tasks come in: RFC-822 mails and R lazy-load databases."""

from __future__ import annotations

import email
import email.errors
import email.header
import gzip
import re
import warnings
import zlib
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path


class _HTMLText(HTMLParser):
    """Collects the text of an HTML document (entities decoded), skipping scripts and style sheets."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)


_LOOKS_LIKE_HTML = re.compile(r"\A\s*<[a-z!]|<(html|body)\b", flags=re.IGNORECASE)


def _strip_tags(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return " ".join(parser.chunks)


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True) or b""  # undoes base64 / quoted-printable
    try:
        return payload.decode(part.get_content_charset() or "latin-1", errors="replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("latin-1")


def _mail_body(part: Message) -> str:
    # Decoded text/plain and text/html parts (tags stripped), headers dropped. Of a multipart/alternative only
    # the first non-empty rendering (usually text/plain) is kept, so a body is not read twice.
    if part.is_multipart():
        texts = [_mail_body(p) for p in part.get_payload()]
        if part.get_content_subtype() == "alternative":
            return next((t for t in texts if t.strip()), "")
        return "\n".join(t for t in texts if t.strip())
    content_type = part.get_content_type()
    if content_type not in ("text/plain", "text/html"):
        return ""
    text = _decoded_text(part)
    # Much spam sends HTML as text/plain: strip it too, or raw tags alone would give the label away.
    return _strip_tags(text) if content_type == "text/html" or _LOOKS_LIKE_HTML.search(text) else text


def _mail_subject(message: Message) -> str:
    # RFC 2047 encoded words decoded; kept raw when they do not decode.
    raw = str(message.get("Subject", ""))
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (email.errors.HeaderParseError, LookupError, UnicodeDecodeError):
        return raw


def mail_text(raw_mail: str) -> str:
    """`"<subject>\n<body>"` of a raw RFC-822 mail, each on one line (whitespace runs collapsed)."""
    message = email.message_from_string(raw_mail)
    return " ".join(_mail_subject(message).split()) + "\n" + " ".join(_mail_body(message).split())


def read_r_lazyload(prefix: Path) -> dict[str, object]:
    """The objects of an R lazy-load database (`<prefix>.rdx` + `<prefix>.rdb`), by name."""
    # An R lazy-load database: `<prefix>.rdx` is a gzipped serialized index (name -> offset, length into the
    # `.rdb`); each `.rdb` chunk is a 4-byte big-endian uncompressed length, then zlib data of one object.
    try:
        import rdata
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "Reading the austen task needs PyPI `rdata` (and `xarray`, which it imports). Install them with "
            "`pip install --no-deps rdata==1.1.0 xarray==2026.9.0` (or run `bash benchmarks/fetch_data.sh`).",
            name=error.name,
        ) from error

    def parse(serialized: bytes) -> object:
        with warnings.catch_warnings():  # the chunks have no file magic; rdata warns, then reads them right
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(serialized))

    index = parse(gzip.decompress(prefix.with_name(prefix.name + ".rdx").read_bytes()))
    blob = prefix.with_name(prefix.name + ".rdb").read_bytes()
    return {str(name): parse(zlib.decompress(blob[offset + 4 : offset + length]))
            for name, (offset, length) in index["variables"].items()}  # fmt: skip
