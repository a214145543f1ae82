"""The import graph of src/slmkit, imports inside functions counted: its circles, the imports that climb back up a
layer, and how many imports sit inside functions (where the spine test's module-level graph does not look).

    python tools/import_graph.py [--json]

Layers, lowest first (a module may import its own layer and those below): the floor (errors, config, progress, ...),
card, data/ and native/ (the kernels), the store and layers/, sources/, engine/, compress/, model.py and loading.py, train/,
evaluate/ and export/, route/, recipe/, serve/, then the faces (cli/, doctor.py, the package). `if TYPE_CHECKING:` imports
are left out (they never run)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slmkit"
LAYERS = [
    {"errors", "faults", "progress", "version", "cpu_build", "config", "gguf_tables"},
    {"card", "data", "native"},
    {"store", "layers"},
    {"sources"},
    {"engine"},
    {"compress"},
    {"model", "loading"},
    {"train"},
    {"evaluate", "export"},
    {"route"},
    {"recipe"},
    {"serve"},
    {"cli", "doctor", "__init__", "__main__"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def modules() -> dict[str, Path]:
    return {".".join(("slmkit",) + p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p for p in SRC.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported slmkit module, inside a function, line) for every import that runs."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("slmkit"):
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("slmkit")]
        out += [(t, id(node) in inside, node.lineno) for t in dict.fromkeys(targets) if t in known]
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(out)


def report() -> dict:
    known = modules()
    graph: dict[str, set[str]] = {}
    upward, in_functions = [], []
    for mod, path in known.items():
        for target, in_fn, line in imports(path, known):
            if target == mod or target == "slmkit":
                continue
            graph.setdefault(mod, set()).add(target)
            where = f"{path.relative_to(SRC.parent)}:{line}"
            if in_fn:
                in_functions.append(f"{where} {target}")
            if layer_of(target) > layer_of(mod):
                upward.append(f"{where} {mod} -> {target}")
    return {"circles": circles(graph), "upward": sorted(upward), "imports_in_functions": len(in_functions),
            "files_with_imports_in_functions": len({w.split(":")[0] for w in in_functions})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    r = report()
    if ap.parse_args().json:
        print(json.dumps(r, indent=2))
        return
    print(f"circles: {len(r['circles'])}")
    for c in r["circles"]:
        print("  " + " <-> ".join(c))
    print(f"imports that climb a layer: {len(r['upward'])}")
    for u in r["upward"]:
        print("  " + u)
    print(f"imports inside functions: {r['imports_in_functions']} in {r['files_with_imports_in_functions']} files")


if __name__ == "__main__":
    main()
