"""The house, measured: small files, no import cycles, one method table, sections that never
overwrite each other in a report."""
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

    # compose.py adds steps to a method, DSnoT is only such a step (a refinement) and permute.py a part of RIA's
    # N:M selection: not methods of their own
    files = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base", "compose", "dsnot", "permute"}
    modules = {m.fn.__module__.rsplit(".", 1)[-1] for m in methods.METHODS.values()}
    assert files == modules, f"method files without a table entry: {files - modules}"
    for name, m in methods.METHODS.items():
        assert m.name == name and m.make_options() == m.options()
