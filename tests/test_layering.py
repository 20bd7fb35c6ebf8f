"""The package's imports go one way: no cycles, no edge that climbs the layers, nobody imports the CLI.

Parses ``src/maskdiff`` with :mod:`ast` (module-level *and* function-level imports; no torch
needed) and builds the graph of intra-package imports. Layers, lowest first (a module may import
its own layer and the ones below it, except where a stricter rule is stated)::

    infrastructure  _version, fileio, devices, checkpoint      (may import: fileio, _version)
    math            schedules, forward, losses, cross_entropy, metrics, sampling.*
    networks        networks.*, model
    data            data.*                                       (may import: data.*, fileio)
    config/build    config, build
    run folders     runs, evaluate
    training        training.*
    package root    maskdiff/__init__ (the public API)
    apps            apps.*
    cli             cli, __main__                                (imported by nothing)

The allow-list below names edges that may break the rules for now; it is empty and should stay so.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "maskdiff"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("infrastructure", ("_version", "fileio", "devices", "checkpoint")),
    ("math", ("schedules", "forward", "losses", "cross_entropy", "metrics", "sampling")),
    ("networks", ("networks", "model")),
    ("data", ("data",)),
    ("config", ("config", "build")),
    ("run folders", ("runs", "evaluate")),
    ("training", ("training",)),
    ("package root", ("",)),
    ("apps", ("apps",)),
    ("cli", ("cli", "__main__")),
]

# Layers that may import only a named subset of what is below them.
RESTRICTED = {
    "infrastructure": ("fileio", "_version"),
    "data": ("data", "fileio"),
}

# (importer, imported) pairs tolerated for now. Empty: every edge obeys the rules.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that ``import name`` executes last (a submodule if it exists)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every intra-package module ``module`` imports, wherever in the file the import sits."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when it exists.
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def layer_of(module: str) -> tuple[int, str]:
    rest = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    top = rest.split(".")[0]
    for rank, (name, tops) in enumerate(LAYERS):
        if top in tops:
            return rank, name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


def _top(module: str) -> str:
    return module[len(PACKAGE) + 1:].split(".")[0] if module != PACKAGE else ""


def edge_violation(src: str, dst: str) -> str | None:
    """Why the edge src → dst breaks the layer rules, or None when it is allowed."""
    (r_src, l_src), (r_dst, l_dst) = layer_of(src), layer_of(dst)
    if _top(dst) in ("cli", "__main__") and _top(src) not in ("cli", "__main__"):
        return "imports the CLI"
    if r_dst > r_src:
        return f"climbs from {l_src} up to {l_dst}"
    allowed = RESTRICTED.get(l_src)
    if allowed is not None and _top(dst) not in allowed:
        return f"{l_src} may import only {', '.join(allowed)}"
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def graph_summary() -> dict[str, int]:
    """Counts quoted in the changelog: modules, edges, cycles, edges that break the rules."""
    graph = import_graph()
    bad = [(s, d) for s, ds in graph.items() for d in ds if edge_violation(s, d)]
    return {"modules": len(graph), "edges": sum(len(d) for d in graph.values()),
            "cycles": len(find_cycles(graph)), "bad_edges": len(bad)}


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_import_cycles():
    graph = {s: {d for d in ds if (s, d) not in ALLOWED} for s, ds in import_graph().items()}
    assert find_cycles(graph) == []


def test_imports_go_down_the_layers():
    bad = [f"{s} -> {d}: {why}" for s, ds in sorted(import_graph().items()) for d in sorted(ds)
           if (why := edge_violation(s, d)) and (s, d) not in ALLOWED]
    assert bad == [], "\n".join(bad)


def test_nothing_imports_the_cli():
    importers = [s for s, ds in import_graph().items() for d in ds if _top(d) in ("cli", "__main__")
                 and _top(s) not in ("cli", "__main__") and (s, d) not in ALLOWED]
    assert importers == []


def test_allow_list_is_empty_and_current():
    graph = import_graph()
    stale = [e for e in ALLOWED if e[1] not in graph.get(e[0], set())]
    assert stale == [], f"allow-list entries that no longer exist: {stale}"
    assert ALLOWED == set()


def test_checker_catches_a_cycle_and_a_climb():
    # Power check: the detector finds a planted cycle and a planted upward edge.
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert edge_violation("maskdiff.losses", "maskdiff.config")
    assert edge_violation("maskdiff.apps.plots", "maskdiff.cli") == "imports the CLI"
    assert edge_violation("maskdiff.data.wiki", "maskdiff.schedules")
    assert edge_violation("maskdiff.checkpoint", "maskdiff.config")
    assert edge_violation("maskdiff.training.trainer", "maskdiff.evaluate") is None


if __name__ == "__main__":  # python tests/test_layering.py: print the counts
    print(graph_summary())
    g = import_graph()
    for cyc in find_cycles(g):
        print("cycle:", " ".join(cyc))
    for s, ds in sorted(g.items()):
        for d in sorted(ds):
            if (why := edge_violation(s, d)):
                print(f"{s} -> {d}: {why}")
