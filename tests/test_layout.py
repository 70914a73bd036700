"""The package's import structure: no cycles, layers pointing one way, every module importable alone.

The graph is read from the source (every import statement, also inside functions: a lazy import is
still a dependency; ``if TYPE_CHECKING:`` blocks are not imports at run time). Layers, lowest first:
kernels, the core, pipelines, sparsity_search, cli (DESIGN.md): a module imports only its own layer
and those below. The facade ``vdit_accel/__init__.py`` re-exports and imports the upper layers lazily,
so no module below the cli may import it.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"vdit_accel": "vdit_accel", "kernels": "vdit_accel.kernels", "pipelines": "vdit_accel.pipelines",
           "sparsity_search": "vdit_accel.sparsity_search", "cli": "vdit_accel.cli"}
LAYERS = ["vdit_accel.kernels", "vdit_accel", "vdit_accel.pipelines", "vdit_accel.sparsity_search", "vdit_accel.cli"]


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts]) if parts else package
            if folder == "vdit_accel" and parts and parts[0] in ("kernels", "pipelines", "sparsity_search", "cli"):
                continue  # not a source folder of vdit_accel itself
            mods[name] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                target = a.name
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for a in node.names:
                if f"{module}.{a.name}" in mods:
                    out.add(f"{module}.{a.name}")
                elif module in mods:
                    out.add(module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(name)
    return out


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def _layer(module: str) -> int:
    return max(i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + "."))


def test_no_import_cycles():
    _, graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_point_one_way():
    _, graph = _graph()
    top = len(LAYERS) - 1  # cli: the facade's users, above everything it imports
    wrong = [(m, t) for m, targets in graph.items() if m != "vdit_accel" for t in targets
             if (t == "vdit_accel" and _layer(m) < top) or (t != "vdit_accel" and _layer(t) > _layer(m))]
    assert not wrong, "imports against the layering (or of the facade vdit_accel): " + ", ".join(f"{m} -> {t}" for m, t in wrong)


def test_the_graph_sees_lazy_imports():
    """The checker itself: a function-level import counts, a TYPE_CHECKING one does not."""
    _, graph = _graph()
    assert "vdit_accel.pipelines" in graph["vdit_accel"]  # patch() imports it inside the function
    assert "vdit_accel.kernels.permute" in graph["vdit_accel.orders.semantic"]  # inside functions


def test_every_module_imports_alone_in_either_order():
    """Each module imports in a fresh interpreter whichever is imported first (all in name order, then in
    reverse order): no module depends on another having been imported before it."""
    names = sorted(_modules())
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for order in (names, names[::-1]):
        code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
        res = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]


def test_the_kernels_folder_does_not_shadow_the_kernels_distribution():
    """Run from the checkout root (its folder ``kernels/`` first on ``sys.path``), ``import kernels`` is
    Hugging Face's distribution, which transformers >= 5.25 imports, and transformers' T5 still loads;
    without that distribution the name is an empty module, none of ours."""
    code = ("import importlib.metadata, kernels\n"
            "try:\n    importlib.metadata.version('kernels'); print('dist', kernels.__file__)\n"
            "except importlib.metadata.PackageNotFoundError:\n    print('none', hasattr(kernels, 'attention_fwd'))\n"
            "from transformers import T5EncoderModel\nprint(T5EncoderModel.__name__)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    kind, what = res.stdout.split("\n")[0].split(" ", 1)
    if kind == "dist":
        assert not Path(what).resolve().is_relative_to(REPO / "kernels"), what
    else:
        assert what == "False"
    assert res.stdout.split("\n")[1] == "T5EncoderModel"
