"""The house, measured: small files, no import cycles, layers that import only downwards, one method
table, sections that never overwrite each other in a report."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wanda_pl"
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    """Modules of ``wanda_pl`` this file imports, at the top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c.split(".")[0] == "wanda_pl")
    return found


def graph():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # An import names a module, or a name inside one: keep the longest module prefix.
        targets = set()
        for t in imports_of(path):
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                targets.add(t)
        edges[name] = targets
    return edges


def find_cycle(edges):
    """A cycle as a list of modules, or None (depth-first search, colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                found = visit(nxt)
                if found:
                    return found
        colour[node] = "black"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    # package-relative imports are resolved: core.engine imports core.layers, not a phantom
    assert "wanda_pl.core.layers" in graph()["wanda_pl.core.engine"]


# The layers, lowest first (README, "Layout"): a package imports only from its own layer's package
# and the layers below it. ``errors`` is the floor everything may raise from; ``cli.py`` is the top.
LAYERS = (
    ("errors",),
    ("core",),
    ("methods",),
    ("assets",),
    ("data", "eval", "training", "families"),
    ("modules", "callbacks"),
    ("commands",),
)


def layer_of(module: str) -> int:
    package = module.split(".")[1] if "." in module else ""
    for rank, packages in enumerate(LAYERS):
        if package in packages:
            return rank
    raise AssertionError(f"{module}: its package {package!r} is in no layer of LAYERS; add it where it belongs")


def upward_imports(edges):
    """(importer, imported) pairs that cross into another package of the same or a higher layer."""
    bad = []
    for name, targets in sorted(edges.items()):
        if name == "wanda_pl":
            continue  # the package's own __init__ re-exports, it is not a layer
        for t in sorted(targets):
            if t.split(".")[:2] != name.split(".")[:2] and layer_of(t) >= layer_of(name):
                bad.append((name, t))
    return bad


def test_every_package_imports_only_from_the_layers_below():
    bad = upward_imports(graph())
    assert not bad, "imports up or across the layers: " + "; ".join(f"{a} -> {b}" for a, b in bad)


def test_the_layer_check_catches_an_upward_import():
    assert upward_imports({"wanda_pl.core.engine": {"wanda_pl.methods.base"}}) == \
        [("wanda_pl.core.engine", "wanda_pl.methods.base")]
    assert upward_imports({"wanda_pl.modules.x": {"wanda_pl.callbacks.y"}})  # same layer, another package
    assert not upward_imports({"wanda_pl.methods.wanda": {"wanda_pl.core.sparsity", "wanda_pl.methods.base"}})


def test_no_file_over_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_package_says_what_it_is_for():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(PACKAGE.parent)} has no docstring"


def test_report_sections_never_overwrite_each_other():
    from wanda_pl.commands.report import assemble

    report = assemble(model={"model": "m", "dtype": "float32"}, method={"method": "wanda"}, results={"ppl": 1.0})
    assert report["sections"] == {"model": ["model", "dtype"], "method": ["method"], "results": ["ppl"]}
    with pytest.raises(ValueError, match="'model' and the 'data'"):
        assemble(model={"model": "m"}, data={"model": "other"})
    with pytest.raises(ValueError, match="reserved"):
        assemble(results={"sections": 1})


def test_the_method_table_names_every_method_file():
    from wanda_pl import methods

    # compose.py adds steps to a method, settings.py checks a whole pruning's settings and permute.py is a
    # part of RIA's N:M selection, presets.py names combinations of settings: not methods of their own; a
    # step (DSnoT, ADMM's update) is in STEPS
    files = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base", "compose", "permute",
                                                                   "settings", "presets"}
    modules = {m.fn.__module__.rsplit(".", 1)[-1] for m in methods.METHODS.values()}
    modules |= {s.apply.__module__.rsplit(".", 1)[-1] for s in methods.STEPS.values()}
    assert files == modules, f"method files without a table entry: {files - modules}"
    for name, m in methods.METHODS.items():
        assert m.name == name and m.make_options() == m.options()
