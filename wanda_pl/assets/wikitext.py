"""Plain text out of MediaWiki wikitext: the cleaning behind the embedded Wikipedia asset.

A pure function, kept apart from the asset that uses it so that its rules (see the tests)
can be read and tested without a dump.
"""
from __future__ import annotations

import html
import re
from typing import Iterator, List

# Sections that are lists of sources and links rather than prose: dropped with their subsections.
SKIP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "references and notes",
    "works cited", "primary sources", "secondary sources",
}
_DROP_NAMESPACES = ("file", "image", "category", "media")
# Tags whose whole content is dropped (refs, formulas, code listings, galleries, ...).
_DROP_ELEMENTS = ("ref", "math", "gallery", "source", "syntaxhighlight", "timeline", "imagemap",
                  "score", "chem", "ce", "hiero", "graph", "mapframe")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_SELF_CLOSING = re.compile(r"<(?:%s)\b[^<>]*/\s*>" % "|".join(_DROP_ELEMENTS), re.I)
_ELEMENT = re.compile(r"<(%s)\b[^<>]*>.*?</\1\s*>" % "|".join(_DROP_ELEMENTS), re.I | re.S)
_UNCLOSED_REF = re.compile(r"<ref\b[^<>]*>.*?(?=\n\n|\Z)", re.I | re.S)
_EXT_LINK = re.compile(r"\[(?:[a-z][a-z+.-]*:)?//[^\s\[\]]*\s*([^\[\]]*)\]", re.I)
_BOLD_ITALIC = re.compile(r"'''''|'''|''")
_BR = re.compile(r"<br\s*/?\s*>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_LIST_MARKER = re.compile(r"^(?:[*#:;]\s*)+")
_INTERLANGUAGE = re.compile(r"^[a-z][a-z0-9-]*:")


def _strip_templates(text: str) -> str:
    """Remove ``{{...}}`` (nested, and ``{{{param}}}``); an unclosed one runs to the end."""
    out: List[str] = []
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        if text.startswith("{{", i):
            depth += 1
            i += 2
        elif text.startswith("}}", i):
            if depth:
                depth -= 1
            i += 2  # a stray "}}" is dropped too
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _strip_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables (nested); both markers count at the start of a line."""
    out: List[str] = []
    depth = 0
    for line in text.split("\n"):
        s = line.lstrip()
        # "{|" may be written after list/indent markers, e.g. ":{| class=..."
        if s.lstrip(":").startswith("{|"):
            depth += 1
            continue
        if depth:
            if s.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def _link(inner: str) -> str:
    target, sep, label = inner.partition("|")
    target = target.strip()
    visible = target.startswith(":")
    name = target.lstrip(":").strip()
    prefix = name.split(":", 1)[0].strip().lower() if ":" in name else ""
    if not visible and prefix in _DROP_NAMESPACES:
        return ""  # images, files, category tags
    if not visible and not sep and _INTERLANGUAGE.match(name):
        return ""  # interlanguage / bare interwiki links: [[de:Anarchismus]]
    if sep:
        label = label.strip()
        if label:
            return label
        # the pipe trick: [[Namespace:Foo (bar)|]] shows "Foo"
        name = name.split(":", 1)[-1]
        return re.sub(r"\s*\([^()]*\)\s*$", "", name)
    return name


def _strip_links(text: str) -> str:
    """Replace ``[[...]]`` links (nested: a file caption may hold links) by their visible text."""
    out: List[str] = []
    i = 0
    while True:
        start = text.find("[[", i)
        if start < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:start])
        depth, j = 1, start + 2
        while depth and j < len(text):
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
            else:
                j += 1
        if depth:  # never closed (a truncated page): drop the rest of the line
            end = text.find("\n", start)
            i = len(text) if end < 0 else end
            continue
        inner = _strip_links(text[start + 2:j - 2])
        out.append(_link(inner))
        i = j


def _lines(text: str) -> Iterator[str]:
    skip_level = 0  # > 0 while inside a skipped section of that level
    for raw in text.split("\n"):
        line = raw.strip()
        h = _HEADING.match(line)
        if h:
            level, title = len(h.group(1)), h.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in SKIP_SECTIONS else 0
            if not skip_level and title:
                yield ""
                yield title
            continue
        if skip_level:
            continue
        line = _LIST_MARKER.sub("", line).strip()
        yield line


def strip_wikitext(text: str) -> str:
    """Plain text of a MediaWiki article's wikitext (a pure function; see the tests for the rules)."""
    text = text.replace("\r\n", "\n")
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _ELEMENT.sub("", text)
    text = _UNCLOSED_REF.sub("", text)  # a truncated dump may cut a reference open
    text = _strip_templates(text)
    text = _strip_tables(text)
    text = _strip_links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1).strip(), text)
    text = _BOLD_ITALIC.sub("", text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = [re.sub(r"[ \t]{2,}", " ", line) for line in _lines(text)]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
