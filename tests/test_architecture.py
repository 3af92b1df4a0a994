"""The package's import graph (parsed with `ast`, every import, also those inside functions): no
cycles, and no lower layer importing a higher one (docs/architecture.md draws the layers)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a module may import its own layer and the ones below. The postprocessor chain, the
# client side and the server side are one layer, but client and server never import each other.
LAYERS = [
    ("core", ["fedsim", "fedsim.core", "fedsim.cache", "fedsim.metrics"]),
    ("config schema and data", ["fedsim.schema", "fedsim.data"]),
    ("models", ["fedsim.models"]),
    ("privacy mechanisms", ["fedsim.privacy"]),
    ("chain, client, server", ["fedsim.postprocessors", "fedsim.client", "fedsim.server", "fedsim.baselines"]),
    ("driver", ["fedsim.config", "fedsim.prepare", "fedsim.simulation", "fedsim.compare", "fedsim.report", "fedsim.tracking",
                "fedsim.unlearning", "fedsim.inprocess", "fedsim.reference", "fedsim.runs"]),
    ("entry points", ["fedsim.tuning", "fedsim.cli"]),
]
APART = [("fedsim.client", "fedsim.server"), ("fedsim.server", "fedsim.client")]


def modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "fedsim").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(head + ([node.module] if node.module else []))
                # `from fedsim.x import y` is an import of fedsim.x.y when y is a module
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer of tests/test_architecture.py"
    return level


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_lower_layer_imports_a_higher_one():
    bad = []
    for m, deps in import_graph().items():
        for d in deps:
            if layer_of(d) > layer_of(m):
                bad.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
            if any(m.startswith(a) and d.startswith(b) for a, b in APART):
                bad.append(f"{m} imports {d}")
    assert bad == []


def test_the_named_layering_breaks_are_gone():
    g = import_graph()
    assert not {d for d in g["fedsim.privacy.dp_lora"] | g["fedsim.privacy.secagg"] if d == "fedsim.postprocessors"}
    assert "fedsim.client.state" not in g["fedsim.models.split"]
    assert "fedsim.simulation" not in g["fedsim.server.split_server"]
