"""The embedded text: real English Wikipedia (a MediaWiki dump shipped in ``gensim``'s test data),
and news articles of another kind (``lee_background.cor`` in the same wheel).

``ensure("wikipedia")`` is a folder with ``calibration.txt``, ``evaluation.txt`` (held out,
disjoint by article, by a hash of the title) and ``articles.json``: calibration and perplexity
text that needs no hub and cannot leak between the two parts. ``ensure("news")`` is the same
for the 300 news articles (split by a hash of the article's text): a second held-out text,
so a model tuned on Wikipedia is not judged only on Wikipedia.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Tuple

from .fetch import AssetError, PackageFile, converted, fetch
from .wikitext import SKIP_SECTIONS, strip_wikitext

WIKIPEDIA_DUMP = PackageFile(
    package="gensim",
    version="4.4.0",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)

NEWS_FILE = PackageFile(
    package="gensim",
    version="4.4.0",
    member="gensim/test/test_data/lee_background.cor",
    sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
)
NEWS_FORMAT = "1"
# Half the articles held out: the news text is mainly a second evaluation text (about 40k tokens each part).
NEWS_MODULUS = 2
NEWS_SPLIT_RULE = f"evaluation if int(sha256(article.encode('utf-8')).hexdigest(), 16) % {NEWS_MODULUS} == 0 else calibration"

# Bump when the conversion code changes so existing caches are rebuilt, not silently reused.
WIKIPEDIA_FORMAT = "2"

EVAL_MODULUS = 5
SPLIT_RULE = f"evaluation if int(sha256(title.encode('utf-8')).hexdigest(), 16) % {EVAL_MODULUS} == 0 else calibration"


def iter_pages(dump: Path) -> Iterator[Tuple[str, int, bool, str]]:
    """(title, namespace, is_redirect, wikitext) for each page of a bz2 MediaWiki XML dump."""
    with bz2.open(dump, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            title, ns, redirect, text = "", -1, False, ""
            for child in elem.iter():
                tag = child.tag.rsplit("}", 1)[-1]
                if tag == "title":
                    title = child.text or ""
                elif tag == "ns":
                    ns = int(child.text or -1)
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = child.text or ""
            yield title, ns, redirect, text
            elem.clear()


def is_evaluation(title: str) -> bool:
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % EVAL_MODULUS == 0


def wikipedia() -> Path:
    """Folder with ``calibration.txt``, ``evaluation.txt`` (disjoint by article) and ``articles.json``."""

    def build(tmp: Path) -> dict:
        dump = fetch(WIKIPEDIA_DUMP)
        parts = {"calibration": [], "evaluation": []}
        articles = []
        skipped = {"redirect": 0, "namespace": 0, "empty": 0}
        for title, ns, redirect, wikitext in iter_pages(dump):
            if ns != 0:
                skipped["namespace"] += 1
                continue
            if redirect or re.match(r"\s*#redirect", wikitext, re.I):
                skipped["redirect"] += 1
                continue
            text = strip_wikitext(wikitext)
            if not text:
                skipped["empty"] += 1
                continue
            part = "evaluation" if is_evaluation(title) else "calibration"
            parts[part].append(text)
            articles.append({"title": title, "part": part, "chars": len(text)})
        if not parts["calibration"] or not parts["evaluation"]:
            raise AssetError(f"the Wikipedia split left a part empty: {[(k, len(v)) for k, v in parts.items()]}")
        summary = _write_parts(tmp, parts)
        source = {"package": WIKIPEDIA_DUMP.package, "version": WIKIPEDIA_DUMP.version,
                  "member": WIKIPEDIA_DUMP.member, "sha256": WIKIPEDIA_DUMP.sha256}
        (tmp / "articles.json").write_text(json.dumps(
            {"source": source, "split_rule": SPLIT_RULE, "skipped_sections": sorted(SKIP_SECTIONS),
             "skipped_pages": skipped, **summary, "articles": articles},
            indent=1, ensure_ascii=False), encoding="utf-8")
        return {"source": source, "split_rule": SPLIT_RULE, **summary}

    return converted("data/wikipedia", build, version=WIKIPEDIA_FORMAT)


def news() -> Path:
    """Folder with ``calibration.txt``, ``evaluation.txt`` (disjoint by article) and ``articles.json``
    of the 300 news articles (one per line in the file)."""

    def build(tmp: Path) -> dict:
        articles = [line.strip() for line in fetch(NEWS_FILE).read_text(encoding="utf-8").splitlines()]
        parts = {"calibration": [], "evaluation": []}
        index = []
        for i, article in enumerate(a for a in articles if a):
            held_out = int(hashlib.sha256(article.encode("utf-8")).hexdigest(), 16) % NEWS_MODULUS == 0
            part = "evaluation" if held_out else "calibration"
            parts[part].append(article)
            index.append({"article": i, "part": part, "chars": len(article), "opening": article[:60]})
        if not parts["calibration"] or not parts["evaluation"]:
            raise AssetError(f"the news split left a part empty: {[(k, len(v)) for k, v in parts.items()]}")
        summary = _write_parts(tmp, parts)
        source = {"package": NEWS_FILE.package, "version": NEWS_FILE.version, "member": NEWS_FILE.member,
                  "sha256": NEWS_FILE.sha256}
        (tmp / "articles.json").write_text(json.dumps(
            {"source": source, "split_rule": NEWS_SPLIT_RULE, **summary, "articles": index}, indent=1,
            ensure_ascii=False), encoding="utf-8")
        return {"source": source, "split_rule": NEWS_SPLIT_RULE, **summary}

    return converted("data/news", build, version=NEWS_FORMAT)


def _write_parts(tmp: Path, parts: dict) -> dict:
    summary = {}
    for part, texts in parts.items():
        joined = "\n\n".join(texts) + "\n"
        (tmp / f"{part}.txt").write_text(joined, encoding="utf-8")
        summary[part] = {"articles": len(texts), "chars": len(joined)}
    return summary


def texts(folder: Path) -> Tuple[str, str]:
    """(calibration text, evaluation text) of an embedded text asset's folder."""
    return ((folder / "calibration.txt").read_text(encoding="utf-8"),
            (folder / "evaluation.txt").read_text(encoding="utf-8"))
