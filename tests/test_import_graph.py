"""The package's import graph, read from the source with ``ast`` (nothing is imported): no module imports itself
through others, and the lower layers never import the upper ones.

Every ``import`` counts, also inside functions, where a circle is easily hidden. An import of ``a.b.c`` also runs
``a/__init__`` and ``a/b/__init__``, so it is an edge to those packages too (except to the importer's own
packages). Not counted: the ``if __name__ == "__main__":`` block of a module that doubles as a script alias of the
command line (it runs only when the file is the program, never when the module is imported), and modules named in
strings (``importlib.import_module``, the command line's lazy subcommands, PEP 562 ``__getattr__``).

Read the same way: no function of the package takes more than eight parameters.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "oefsmc_jax"

#: (importer prefix, forbidden prefixes): a module under the first may import none under the second
LAYERS = [
    # the models take the convolution they call as an argument (build_model(spec, conv_general_dilated=...)): the
    # trainer injects a kernel's, the models never import one
    ("oefsmc_jax.models", ("oefsmc_jax.training", "oefsmc_jax.methods", "oefsmc_jax.run", "oefsmc_jax.main",
                           "oefsmc_jax.experiments", "oefsmc_jax.kernels")),
    ("oefsmc_jax.training", ("oefsmc_jax.methods", "oefsmc_jax.run", "oefsmc_jax.main",
                             "oefsmc_jax.experiments")),
    # a run's data is drawn and checked without the method, OE-FSMC or training code that uses it
    ("oefsmc_jax.data", ("oefsmc_jax.training", "oefsmc_jax.methods", "oefsmc_jax.oe", "oefsmc_jax.run",
                         "oefsmc_jax.teacher", "oefsmc_jax.main", "oefsmc_jax.experiments")),
    ("oefsmc_jax.convert", ("oefsmc_jax.main", "oefsmc_jax.cli_util", "oefsmc_jax.run")),
]


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_main_block(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, outside ``if __name__ == "__main__":`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if _is_main_block(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _graph() -> dict[str, dict[str, int]]:
    """Module -> {imported package module: line of the first such import}."""
    mods = _modules()

    def resolve(name: str) -> str | None:  # the longest prefix of ``name`` that is a module of the package
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, (path, is_pkg) in mods.items():
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}  # the importer's packages
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                target = resolve(t) if t.split(".")[0] == PACKAGE else None
                while target:
                    if target != mod and target not in own:
                        edges.setdefault(target, node.lineno)
                    target = target.rpartition(".")[0]
        graph[mod] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def test_the_graph_sees_imports_at_every_depth():
    graph = _graph()
    assert "oefsmc_jax.training.recipe" in graph["oefsmc_jax.training.step"]  # a top-level import
    assert "oefsmc_jax.run" in graph["oefsmc_jax.main"]  # an import inside a function
    assert "oefsmc_jax.models" in graph["oefsmc_jax.convert.layout"]  # the package of ``from oefsmc_jax.models``
    assert "oefsmc_jax.main" not in graph["oefsmc_jax.convert.akamaster"]  # only its script block imports main


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    lines = [" <-> ".join(c) + ": " + ", ".join(f"{a} -> {b} (line {graph[a][b]})" for a in c for b in graph[a]
                                               if b in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


@pytest.mark.parametrize("layer,forbidden", LAYERS, ids=[layer for layer, _ in LAYERS])
def test_lower_layers_do_not_import_upper_ones(layer, forbidden):
    graph = _graph()
    bad = [f"{mod} -> {target} (line {line})" for mod, edges in sorted(graph.items()) if _under(mod, layer)
           for target, line in sorted(edges.items()) if any(_under(target, f) for f in forbidden)]
    assert not bad, f"{layer} imports an upper layer:\n" + "\n".join(bad)


#: at most this many parameters per function: more are grouped into a config or a value (a frozen dataclass)
MAX_PARAMETERS = 8


def _parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> int:
    """Every parameter, positional and keyword-only, ``*args`` and ``**kwargs`` one each; a leading ``self`` or
    ``cls`` is not counted."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def test_no_function_takes_more_than_eight_parameters():
    sample = ast.parse("def f(self, a, /, b, *c, d, **e): pass\ng = lambda x, *y: x").body
    assert [_parameter_count(n) for n in (sample[0], sample[1].value)] == [5, 2]
    bad = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                n = _parameter_count(node)
                if n > MAX_PARAMETERS:
                    bad.append(f"{rel}:{node.lineno} {getattr(node, 'name', '<lambda>')} takes {n}")
    assert not bad, f"functions with more than {MAX_PARAMETERS} parameters:\n" + "\n".join(bad)
