"""The embedded-asset cache (fetch, verify, convert) and the two real assets built on it.

The fast tests never touch the network: ``fetch.download`` is replaced by a function that
writes a small archive built here. The ``slow`` tests use the real cache (``$WANDA_PL_HOME``),
downloading and converting the real model and Wikipedia text on first use."""
from __future__ import annotations

import ast
import bz2
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest

from wanda_pl.assets import fetch as cache
from wanda_pl.assets import models, resolve
from wanda_pl.assets import registry as assets
from wanda_pl.assets import text as wikipedia
from wanda_pl.assets.fetch import MANIFEST, AssetError, PackageFile
from wanda_pl.assets.wikitext import strip_wikitext

PACKAGE = Path(wikipedia.__file__).resolve().parents[1]  # wanda_pl/
PAYLOAD = b"real asset bytes\n" * 1000
MEMBER = "fakepkg/data/payload.bin"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_wheel(path: Path, payload: bytes = PAYLOAD, member: str = MEMBER) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr(member, payload)
    return path


def _write_sdist(path: Path, payload: bytes = PAYLOAD, member: str = MEMBER) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"fakepkg-1.0/{member}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return path


class FakeRegistry:
    """Stands in for ``pip download``: writes an archive into the folder it is given, counts calls."""

    def __init__(self, payload: bytes = PAYLOAD, kind: str = "wheel", delay: float = 0.0):
        self.payload = payload
        self.kind = kind
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, pf: PackageFile, into: Path) -> Path:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.kind == "wheel":
            return _write_wheel(into / f"{pf.package}-{pf.version}-py3-none-any.whl", self.payload, MEMBER)
        return _write_sdist(into / f"{pf.package}-{pf.version}.tar.gz", self.payload, MEMBER)


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "wanda_home"
    monkeypatch.setenv("WANDA_PL_HOME", str(h))
    return h


@pytest.fixture
def registry(monkeypatch):
    reg = FakeRegistry()
    monkeypatch.setattr(cache, "download", reg)
    return reg


PF = PackageFile("fakepkg", "1.0", MEMBER, _sha(PAYLOAD))


def _cached_files(root: Path) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


# ----------------------------------------------------------------------------- fetch


def test_fetch_downloads_once_and_verifies(home, registry):
    path = cache.fetch(PF)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(home)
    assert cache.fetch(PF) == path
    assert registry.calls == 1
    # only the verified file stays: the downloaded archive and temp folders are gone
    assert _cached_files(home) == [path]


def test_fetch_from_sdist(home, monkeypatch):
    reg = FakeRegistry(kind="sdist")
    monkeypatch.setattr(cache, "download", reg)
    assert cache.fetch(PF).read_bytes() == PAYLOAD


@pytest.mark.parametrize("damage", ["truncate", "modify", "empty"])
def test_damaged_cached_file_is_fetched_again(home, registry, damage):
    path = cache.fetch(PF)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "modify":  # same length, one byte flipped
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        path.write_bytes(b"")
    again = cache.fetch(PF)
    assert registry.calls == 2
    assert again == path
    assert again.read_bytes() == PAYLOAD


def test_wrong_sha256_is_refused_and_leaves_nothing(home, registry):
    bad = PackageFile("fakepkg", "1.0", MEMBER, _sha(b"something else"))
    with pytest.raises(AssetError, match="refusing"):
        cache.fetch(bad)
    assert registry.calls == 1
    assert _cached_files(home) == []
    # nothing half-done stays behind that a later call could pick up
    with pytest.raises(AssetError):
        cache.fetch(bad)
    assert registry.calls == 2
    assert _cached_files(home) == []


def test_tampered_package_is_refused(home, monkeypatch):
    monkeypatch.setattr(cache, "download", FakeRegistry(payload=PAYLOAD[:-1] + b"X"))
    with pytest.raises(AssetError, match=PF.sha256):
        cache.fetch(PF)
    assert _cached_files(home) == []


def test_missing_member_is_an_error(home, registry):
    with pytest.raises(AssetError, match="not found"):
        cache.fetch(PackageFile("fakepkg", "1.0", "fakepkg/nope.bin", PF.sha256))
    assert _cached_files(home) == []


def test_concurrent_fetch_in_threads_downloads_once(home, monkeypatch):
    reg = FakeRegistry(delay=0.5)
    monkeypatch.setattr(cache, "download", reg)
    results, errors = [], []

    def work():
        try:
            results.append(cache.fetch(PF))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert reg.calls == 1
    assert len(set(results)) == 1 and results[0].read_bytes() == PAYLOAD


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from wanda_pl.assets import fetch as cache
    from wanda_pl.assets.fetch import PackageFile

    wheel, counter, sha = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def fake_download(pf, into):
        with open(counter, "a") as f:
            f.write("download\\n")
        time.sleep(1.0)
        target = into / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    cache.download = fake_download
    print(cache.fetch(PackageFile("fakepkg", "1.0", "fakepkg/data/payload.bin", sha)))
    """
)


def test_concurrent_fetch_in_processes_downloads_once(home, tmp_path):
    wheel = _write_wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl")
    counter = tmp_path / "downloads.txt"
    env = {**os.environ, "WANDA_PL_HOME": str(home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(wheel), str(counter), PF.sha256],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == PAYLOAD
    assert counter.read_text().count("download") == 1


# ----------------------------------------------------------------------------- converted


class Builder:
    def __init__(self, delay: float = 0.0):
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, tmp: Path) -> dict:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        (tmp / "a.txt").write_text("alpha " * 100)
        (tmp / "b.bin").write_bytes(bytes(range(256)) * 10)
        return {"made_by": "test"}


def test_converted_builds_once_with_manifest(home):
    build = Builder()
    folder = cache.converted("things/x", build)
    assert folder == home / "things" / "x"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["made_by"] == "test"
    assert manifest["files"] == {
        "a.txt": _sha((folder / "a.txt").read_bytes()),
        "b.bin": _sha((folder / "b.bin").read_bytes()),
    }
    assert cache.converted("things/x", build) == folder
    assert build.calls == 1
    # no temp folders left beside it
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == ["x"]


@pytest.mark.parametrize("damage", ["truncate", "modify", "delete", "manifest"])
def test_converted_rebuilds_a_damaged_folder(home, damage):
    build = Builder()
    folder = cache.converted("things/x", build)
    original = (folder / "b.bin").read_bytes()
    if damage == "truncate":
        (folder / "b.bin").write_bytes(original[:-10])
    elif damage == "modify":
        (folder / "b.bin").write_bytes(original[:5] + b"\xff" + original[6:])
    elif damage == "delete":
        (folder / "b.bin").unlink()
    else:
        (folder / MANIFEST).write_text("{not json")
    assert cache.converted("things/x", build) == folder
    assert build.calls == 2
    assert (folder / "b.bin").read_bytes() == original
    assert cache.manifest_ok(folder)


def test_converted_rebuilds_for_a_new_format_version(home):
    build = Builder()
    folder = cache.converted("things/x", build, version="1")
    cache.converted("things/x", build, version="1")
    assert build.calls == 1
    cache.converted("things/x", build, version="2")
    assert build.calls == 2
    assert json.loads((folder / MANIFEST).read_text())["format_version"] == "2"


def test_failed_build_leaves_nothing(home):
    def broken(tmp: Path) -> dict:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        cache.converted("things/x", broken)
    assert not (home / "things" / "x").exists()
    assert _cached_files(home) == []


def test_concurrent_converted_builds_once(home):
    build = Builder(delay=0.5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.converted("things/x", build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1
    assert len(results) == 4 and len(set(results)) == 1


def test_package_files_downloads_once_for_many_members(home, registry):
    package = ("fakepkg", "1.0", "fakepkg/data/")
    files = cache.package_files(package, {"payload.bin": PF.sha256})
    assert files["payload.bin"] == home / "files" / PF.sha256[:16] / "payload.bin"  # the cache path of fetch()
    assert files["payload.bin"].read_bytes() == PAYLOAD
    assert cache.package_files(package, {"payload.bin": PF.sha256}) == files
    assert cache.fetch(PF) == files["payload.bin"]
    assert registry.calls == 1
    bad = _sha(b"other")
    with pytest.raises(AssetError, match=f"fakepkg/data/payload.bin in fakepkg==1.0 has sha256 {PF.sha256}, "
                                         f"expected {bad}: refusing to use it"):
        cache.package_files(package, {"payload.bin": bad})


def test_converted_tree_checks_the_files_below(home):
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("alpha")
        (tmp / "top.json").write_text("{}")
        return {"made_by": "test"}

    folder = cache.converted_tree("things/tree", build, version="1")
    inventory = json.loads((folder / cache.INVENTORY).read_text())
    assert inventory == {"sub/a.txt": _sha(b"alpha")}
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["tree_files"] == 1 and manifest["format_version"] == "1"
    assert set(manifest["files"]) == {"top.json", cache.INVENTORY}
    assert cache.converted_tree("things/tree", build, version="1") == folder and len(calls) == 1
    (folder / "sub" / "a.txt").write_text("alphA")  # below the top level: only the inventory sees it
    assert cache.manifest_ok(folder, "1")
    assert cache.converted_tree("things/tree", build, version="1") == folder and len(calls) == 2
    assert (folder / "sub" / "a.txt").read_text() == "alpha"
    (folder / "sub" / "extra.txt").write_text("not built")
    cache.converted_tree("things/tree", build, version="1")
    assert len(calls) == 3 and not (folder / "sub" / "extra.txt").exists()


def test_unknown_asset_names_the_known_ones():
    with pytest.raises(AssetError) as err:
        assets.ensure("no-such-asset")
    msg = str(err.value)
    assert "no-such-asset" in msg
    assert "smollm2-135m" in msg and "wikipedia" in msg
    assert msg.endswith("known: " + ", ".join(sorted(assets.REGISTRY)))
    assert assets.AssetError is cache.AssetError  # one error class, whichever module it is imported from


def test_registry_holds_the_embedded_assets():
    assert {"smollm2-135m", "wikipedia"} <= set(assets.REGISTRY)
    assert list(assets.REGISTRY) == ["smollm2-135m", "smollm2-moe-8x135m", "wikipedia", "news", "efficientnet-lite0", "imagenet-photos",
                                       "natural-images", "zero-shot-tasks"]
    for name, asset in assets.REGISTRY.items():
        assert callable(asset.build) and asset.build.__module__.startswith("wanda_pl.assets."), name
        assert asset.kind in assets.KINDS, name


def test_registry_is_the_one_source_of_embedded_names():
    by_kind = {kind: tuple(n for n, a in assets.REGISTRY.items() if a.kind == kind) for kind in assets.KINDS}
    derived = {
        assets.CAUSAL_LM: assets.EMBEDDED_MODELS,
        assets.TEXT: assets.EMBEDDED_TEXT,
        assets.CLASSIFIER: assets.EMBEDDED_CLASSIFIERS,
        assets.IMAGES: assets.EMBEDDED_IMAGES,
        assets.TASK_DATA: assets.EMBEDDED_TASKS,
    }
    assert set(derived) == set(assets.KINDS)
    for kind, names in derived.items():
        assert names == by_kind[kind] == assets.names(kind), kind  # every registry key of that kind, and only those
    # every name has exactly one kind, and every registry key is in one of the tuples
    assert sorted(n for names in derived.values() for n in names) == sorted(assets.REGISTRY)
    assert assets.EMBEDDED_MODELS == ("smollm2-135m", "smollm2-moe-8x135m") and assets.EMBEDDED_TEXT == ("wikipedia", "news")
    assert assets.EMBEDDED_CLASSIFIERS == ("efficientnet-lite0",)
    assert assets.EMBEDDED_IMAGES == ("imagenet-photos", "natural-images")
    assert assets.EMBEDDED_TASKS == ("zero-shot-tasks",)
    # resolve hands on the registry's tuples, it does not keep its own
    assert resolve.EMBEDDED_MODELS is assets.EMBEDDED_MODELS and resolve.EMBEDDED_TEXT is assets.EMBEDDED_TEXT
    with pytest.raises(ValueError, match="unknown asset kind"):
        assets.names("no-such-kind")
    # nowhere else in the package is a list of embedded names defined or an asset registered
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assigned = {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)}
        if path != Path(assets.__file__).resolve():
            assert not {n for n in assigned if n.startswith("EMBEDDED_") or n == "REGISTRY"}, path
        decorators = {ast.unparse(d) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                      for d in node.decorator_list}
        assert not any(d.startswith("register(") for d in decorators), path


def test_news_is_split_by_article_into_two_disjoint_parts():
    """The second held-out text: every article of the file lands in exactly one part, by the hash
    of its own text (the rule the folder states), and the parts are the news, not Wikipedia."""
    import hashlib
    import json

    from wanda_pl.assets.text import NEWS_FILE, NEWS_MODULUS, texts
    from wanda_pl.data.text import load_text

    folder = assets.ensure("news")
    articles = [a.strip() for a in cache.fetch(NEWS_FILE).read_text(encoding="utf-8").splitlines() if a.strip()]
    calibration, evaluation = texts(folder)
    parts = {"calibration": calibration.split("\n\n"), "evaluation": evaluation.split("\n\n")}
    parts = {k: [a.strip() for a in v if a.strip()] for k, v in parts.items()}
    assert sorted(parts["calibration"] + parts["evaluation"]) == sorted(articles) and len(articles) == 300
    assert not set(parts["calibration"]) & set(parts["evaluation"])
    for article in parts["evaluation"]:
        assert int(hashlib.sha256(article.encode("utf-8")).hexdigest(), 16) % NEWS_MODULUS == 0
    assert min(len(v) for v in parts.values()) > 100  # about half each
    info = json.loads((folder / "articles.json").read_text())
    assert info["evaluation"]["articles"] == len(parts["evaluation"]) and "sha256(article" in info["split_rule"]
    assert load_text("news", "evaluation") == evaluation and load_text("news", "calibration") == calibration
    assert "Hill Top" in calibration + evaluation and load_text("wikipedia", "evaluation") != evaluation


def test_embedded_model_names_resolve_through_the_registry(monkeypatch, tmp_path):
    monkeypatch.setitem(assets.REGISTRY, "smollm2-135m",
                        assets.Asset(assets.CAUSAL_LM, lambda: tmp_path / "cached-model"))
    assert resolve.resolve_model("smollm2-135m") == str(tmp_path / "cached-model")
    assert resolve.resolve_model("org/model") == "org/model"  # a hub id, unchanged
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve.resolve_model(str(tmp_path / "no" / "such" / "folder"))


# ----------------------------------------------------------------------------- package layering


def _import_graph() -> dict:
    """module -> the wanda_pl modules it imports (top level or inside functions), from the source."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {}
    for mod, (path, is_pkg) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for name in targets:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def _reaches(graph: dict, start: str) -> set:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


@pytest.mark.parametrize("area", ["wanda_pl.assets", "wanda_pl.data", "wanda_pl.eval"])
def test_no_import_cycle_through_assets_data_or_eval(area):
    graph = _import_graph()
    mine = [m for m in graph if m == area or m.startswith(area + ".")]
    assert len(mine) > 1
    cycles = [m for m in mine if m in _reaches(graph, m)]
    assert not cycles, {m: sorted(graph[m]) for m in cycles}


def test_assets_import_nothing_of_the_pipeline_and_no_private_names():
    graph = _import_graph()
    for mod, deps in graph.items():
        if mod.startswith("wanda_pl.assets"):
            assert all(d.startswith("wanda_pl.assets") for d in deps), (mod, sorted(deps))
    for area in ("assets", "data", "eval"):
        for path in sorted((PACKAGE / area).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.name} imports private {private} from {node.module}"


# ----------------------------------------------------------------------------- wikitext


def test_strip_nested_templates():
    text = "Before {{Infobox|name={{nowrap|X {{small|y}}}}|z=1}}after {{cite web|url=http://a|title=T}}."
    assert strip_wikitext(text) == "Before after ."


def test_strip_unclosed_template_and_stray_braces():
    assert strip_wikitext("Kept text. }} more {{cite book|title=cut off") == "Kept text. more"


def test_strip_tables():
    text = textwrap.dedent(
        """\
        Intro line.
        {| class="wikitable"
        |+ Caption
        ! Header !! Other
        |-
        | cell || {{tmpl|x}}
        |-
        |
          {| class="inner"
          | nested
          |}
        |}
        After the table.
        """
    )
    assert strip_wikitext(text) == "Intro line.\nAfter the table."


def test_strip_refs_comments_and_tags():
    text = (
        'Claim.<ref name="a">Smith, {{cite|x}} p. 3</ref> Again<ref name=a/> and '
        "<ref>multi\nline</ref>done.<!-- hidden\ncomment --> H<sub>2</sub>O is <b>water</b>,"
        " x<br/>y, <math>x^2</math>gone, <span style=\"c\">kept</span>."
    )
    assert strip_wikitext(text) == "Claim. Again and done. H2O is water, x y, gone, kept."


def test_strip_links():
    text = (
        "A [[political philosophy]] of [[self-governance|self-governed]] [[apple]]s, "
        "[[Hudud ul-'alam]], [[:Category:Foo|a category page]], [[Paris (France)|]] and "
        "[[wikt:brigand|brigand]]."
        "[[File:Map.png|thumb|A map of [[Paris]] in [1789] and [[Lyon|the city]]]]"
        "[[Image:X.jpg|left]][[Category:Anarchism| ]][[de:Anarchismus]][[be-x-old:Анархізм]]"
    )
    assert strip_wikitext(text) == (
        "A political philosophy of self-governed apples, Hudud ul-'alam, a category page, Paris and brigand."
    )


def test_strip_external_links():
    text = "See [http://example.org/a?b=1&c=2 the site] or [https://x.org] or [//proto.rel label here]. http://bare.org"
    assert strip_wikitext(text) == "See the site or or label here. http://bare.org"


def test_strip_bold_italic_entities():
    text = "'''Anarchism''' is ''one'' '''''idea''''' &ndash; &quot;x&quot; &amp; y&nbsp;z &lt;tag&gt; &#8212; A&amp;amp;B"
    assert strip_wikitext(text) == 'Anarchism is one idea – "x" & y z <tag> — A&amp;B'


def test_strip_headings_lists_and_blank_lines():
    text = textwrap.dedent(
        """\
        __NOTOC__
        Intro.


        == History ==
        Text one.
        === Early days===
        * item one
        ** item two
        # numbered
        : indented
        ; term : definition
        * {{flag|X}} : after a template



        == See also ==
        * [[Other]]
        === Sub of see also ===
        gone too
        == References ==
        {{reflist}}
        == Legacy ==
        Last.
        """
    )
    assert strip_wikitext(text) == (
        "Intro.\n\nHistory\nText one.\n\nEarly days\nitem one\nitem two\nnumbered\nindented\n"
        "term : definition\nafter a template\n\nLegacy\nLast."
    )


def test_strip_realistic_paragraph():
    text = (
        "{{Use British English|date=January 2014}}\n{{Anarchism sidebar}}\n"
        "'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] "
        "societies.<ref>&quot;ANARCHISM&quot; George Woodcock.</ref><ref name=&quot;x&quot;/> "
        "[[File:Paris Commune.jpg|thumb|upright|The [[Paris Commune]] of 1871]]\n"
        "It was used in 1539.{{citation needed|date=May 2015}}"
    )
    import html

    out = strip_wikitext(html.unescape(text))  # the XML parser decodes one level of entities
    assert out == "Anarchism is a political philosophy that advocates self-governed societies.\nIt was used in 1539."


# markup the cleaned text must never contain
RESIDUE = {
    "template open": r"\{\{",
    "template close": r"\}\}",
    "link open": r"\[\[",
    "link close": r"\]\]",
    "bold": r"'''",
    "italic": r"(?<!')''(?!')",
    "ref": r"<ref",
    "table open": r"\{\|",
    "table close": r"\|\}",
    "html tag": r"</?[A-Za-z][A-Za-z0-9]*(\s[^<>]*)?/?>",
    "comment": r"<!--",
    "entity": r"&(amp|lt|gt|quot|nbsp|ndash|mdash|#\d+);",
    "external link": r"\[https?://",
    "table row": r"(?m)^\s*(\|-|\|\+|!)",
    "file link": r"(?i)\b(thumb|upright)\|",
    "list marker": r"(?m)^[*#:;]",
    "heading": r"(?m)^==",
    "magic word": r"__[A-Z]+__",
}


def _write_dump(path: Path, pages: list) -> Path:
    body = []
    for title, ns, redirect, text in pages:
        from xml.sax.saxutils import escape

        body.append(
            f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>"
            + ('<redirect title="Elsewhere" />' if redirect else "")
            + f'<revision><id>2</id><text xml:space="preserve">{escape(text)}</text></revision></page>'
        )
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
           "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + "".join(body) + "</mediawiki>")
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return path


def test_wikipedia_build_on_a_small_dump(home, tmp_path, monkeypatch):
    titles = [f"Article number {i}" for i in range(30)]
    held_out = [t for t in titles if wikipedia.is_evaluation(t)]
    assert held_out and len(held_out) < len(titles)  # the rule sends some to each part
    pages = [(t, 0, False, f"'''{t}''' is about [[topic {i}|things]].{{{{cite|x}}}}\n\n== Part ==\nBody of {t}.")
             for i, t in enumerate(titles)]
    pages += [("Redirected", 0, True, "#REDIRECT [[Article number 1]]"),
              ("Lowercase redirect", 0, False, "#redirect [[Article number 2]]"),
              ("Wikipedia:Policy", 4, False, "Project page text that must not appear."),
              ("Empty", 0, False, "{{only a template}}")]
    dump = _write_dump(tmp_path / "dump.xml.bz2", pages)
    monkeypatch.setattr(wikipedia, "fetch", lambda pf: dump)

    calibration, evaluation = wikipedia.texts(wikipedia.wikipedia())
    info = json.loads((home / "data" / "wikipedia" / "articles.json").read_text())
    assert info["split_rule"] == wikipedia.SPLIT_RULE
    assert info["skipped_pages"] == {"redirect": 2, "namespace": 1, "empty": 1}
    parts = {a["title"]: a["part"] for a in info["articles"]}
    assert sorted(parts) == sorted(titles)
    assert sorted(t for t, p in parts.items() if p == "evaluation") == sorted(held_out)
    for t in titles:
        body = f"{t} is about things.\n\nPart\nBody of {t}."
        assert (body in evaluation) == (t in held_out)
        assert (body in calibration) == (t not in held_out)
    assert evaluation.count("\n\n") == 2 * len(held_out) - 1
    for text in (calibration, evaluation):
        assert "Project page" not in text and "REDIRECT" not in text.upper()


def test_split_rule_is_the_documented_hash():
    for title in ["Anarchism", "Autism", "A", "Algeria", "Abraham Lincoln"]:
        want = int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 5 == 0
        assert wikipedia.is_evaluation(title) == want
    assert wikipedia.is_evaluation("A") and not wikipedia.is_evaluation("Anarchism")


# ----------------------------------------------------------------------------- real assets (slow)


def _articles(folder: Path, text: str, part: str, info: dict) -> dict:
    """title -> text of each article of ``part``, cut out of the joined text by its char count."""
    out, pos = {}, 0
    for a in info["articles"]:
        if a["part"] == part:
            out[a["title"]] = text[pos:pos + a["chars"]]
            pos += a["chars"] + 2  # "\n\n" between articles
    assert pos - 2 + 1 == len(text)  # and one final newline
    return out


@pytest.fixture(scope="module")
def wiki():
    folder = assets.ensure("wikipedia")
    calibration, evaluation = wikipedia.texts(wikipedia.wikipedia())
    info = json.loads((folder / "articles.json").read_text(encoding="utf-8"))
    return folder, calibration, evaluation, info


@pytest.mark.slow
def test_wikipedia_has_no_markup_residue(wiki):
    _, calibration, evaluation, _ = wiki
    for part, text in (("calibration", calibration), ("evaluation", evaluation)):
        found = {name: m.group(0) for name, pat in RESIDUE.items() if (m := re.search(pat, text))}
        assert not found, f"{part} still holds markup: {found}"
        assert "\n\n\n" not in text


@pytest.mark.slow
def test_wikipedia_split_is_disjoint_and_large(wiki):
    folder, calibration, evaluation, info = wiki
    assert info["source"]["sha256"] == wikipedia.WIKIPEDIA_DUMP.sha256
    assert info["split_rule"] == wikipedia.SPLIT_RULE
    titles = [a["title"] for a in info["articles"]]
    assert len(titles) == len(set(titles)) > 100
    for a in info["articles"]:
        assert a["part"] == ("evaluation" if wikipedia.is_evaluation(a["title"]) else "calibration")
    cal = _articles(folder, calibration, "calibration", info)
    ev = _articles(folder, evaluation, "evaluation", info)
    assert cal and ev and not set(cal) & set(ev)
    assert "Anarchism" in cal and "Algeria" in ev
    assert cal["Anarchism"].startswith("Anarchism is a political philosophy")
    assert len(calibration) > 100_000 and len(evaluation) > 100_000
    assert info["calibration"]["chars"] == len(calibration) and info["evaluation"]["chars"] == len(evaluation)
    # no held-out article's opening paragraph leaks into the calibration text
    for title, text in ev.items():
        first = text.split("\n\n")[0]
        assert len(first) > 40, title
        assert first not in calibration, title
    for title, text in cal.items():
        assert text.split("\n\n")[0] not in evaluation, title


@pytest.mark.slow
def _no_fetch(*args, **kwargs):
    raise AssertionError("a verified cached asset must not be fetched or rebuilt")


def test_cached_wikipedia_is_verified_not_rebuilt(wiki, monkeypatch):
    folder = wiki[0]
    before = (folder / MANIFEST).stat().st_mtime_ns
    monkeypatch.setattr(wikipedia, "fetch", _no_fetch)  # the build's first step
    assert assets.ensure("wikipedia") == folder
    assert (folder / MANIFEST).stat().st_mtime_ns == before


_COMPARE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = sys.argv[1], sys.argv[2]
    sentence = sys.argv[3]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(sentence, return_tensors="pt").input_ids

    def loss(model):
        model.eval()
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    plain = AutoModelForCausalLM.from_pretrained(folder)
    out = {"tokens": ids.shape[1], "plain": loss(plain), "dtype": str(next(plain.parameters()).dtype),
           "class": type(plain).__name__, "params": sum(p.numel() for p in plain.parameters())}
    del plain
    from pathlib import Path
    g = Path(gguf)
    ref = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    gtok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    out["same_ids"] = gtok(sentence, return_tensors="pt").input_ids.tolist() == ids.tolist()
    out["gguf"] = loss(ref)
    print("RESULT " + json.dumps(out))
    """
)

SENTENCE = (
    "The city council met on Tuesday evening to discuss the new library, which will open next spring "
    "near the river. Most residents agreed that the old building was too small for the growing number "
    "of children who visit it every week."
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_converted_model_matches_the_gguf(tmp_path):
    folder = assets.ensure("smollm2-135m")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == models.SMOLLM2_GGUF.sha256
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    gguf = models.smollm2_gguf()
    assert cache.sha256_file(gguf) == models.SMOLLM2_GGUF.sha256
    # offline, with an empty hub cache: the folder must load by itself
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", _COMPARE, str(folder), str(gguf), SENTENCE],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["class"] == "LlamaForCausalLM" and out["dtype"] == "torch.float32"
    assert out["params"] == 134_515_008
    assert 40 <= out["tokens"] <= 60
    assert out["same_ids"]
    assert out["plain"] == pytest.approx(out["gguf"], abs=1e-5)
    assert out["plain"] < 5.0  # a trained model, not a random one (ln 49152 = 10.8)


@pytest.mark.slow
def test_cached_model_is_verified_not_rebuilt(monkeypatch):
    folder = assets.ensure("smollm2-135m")
    before = (folder / MANIFEST).stat().st_mtime_ns
    monkeypatch.setattr(models, "fetch", _no_fetch)  # the build's first step (the GGUF)
    assert assets.ensure("smollm2-135m") == folder
    assert (folder / MANIFEST).stat().st_mtime_ns == before
