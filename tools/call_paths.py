"""The files a model name passes through on its way to the weights or the engine, measured by running the real code:
a profile hook watches for the target function and, when it is called, reads the Python stack back to the first
slmkit frame. Reports each path's modules in call order, how many files it crosses, and how many of its steps call
back up a layer (tools/import_graph.py's layers).

    python tools/call_paths.py [--json]

Paths measured (on the default model, in a temporary SLMKIT_HOME; about a minute):
  prune   `slmkit prune MODEL --sparsity 0.5` until the float weights are read (sources/hf_dir.load_float);
  serve   a chat request to `slmkit serve`'s app until the engine is built (a backend's __init__); the route hands the
          name to the registry in a worker thread, where the path is read.
The spine test runs the same measure on a tiny model (tests/test_spine.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from import_graph import SRC, layer_of  # noqa: E402

ENGINES = ("slmkit.engine.torch_backend", "slmkit.engine.llamacpp_backend")  # where a served path ends: an engine is built
Target = Callable[[str, str], bool]  # (module, function name) -> is this where the path ends?


def module_of(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(SRC)
    except ValueError:
        return None
    return ".".join(("slmkit",) + rel.with_suffix("").parts).removesuffix(".__init__")


def trace(run: Callable[[], Any], target: Target) -> list[str]:
    """Run `run()`; the slmkit modules on the stack (outermost first, repeats folded) the first time a function for
    which `target(module, name)` holds is called, in any thread. [] if it never is."""
    found: list[list[str]] = []

    def hook(frame: Any, event: str, _arg: Any) -> None:
        if found or event != "call":
            return
        mod = module_of(frame.f_code.co_filename)
        if mod is None or not target(mod, frame.f_code.co_name):
            return
        chain: list[str] = []
        f = frame
        while f is not None:
            m = module_of(f.f_code.co_filename)
            if m is not None and (not chain or chain[-1] != m):
                chain.append(m)
            f = f.f_back
        found.append(chain[::-1])

    sys.setprofile(hook)
    threading.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return found[0] if found else []


def summary(chain: list[str]) -> dict[str, Any]:
    """The path, the files it crosses, and its steps from a lower layer up to a higher one."""
    up = [f"{a} -> {b}" for a, b in zip(chain, chain[1:]) if layer_of(b) > layer_of(a)]
    return {"path": chain, "files": len(set(chain)), "steps": max(len(chain) - 1, 0), "upward": up}


def prune_path(model: str) -> list[str]:
    from typer.testing import CliRunner

    from slmkit.cli import app

    def run() -> None:
        r = CliRunner().invoke(app, ["prune", model, "--sparsity", "0.5", "--name", f"{model}-paths"])
        assert r.exit_code == 0, r.output

    return trace(run, lambda mod, fn: mod == "slmkit.sources.hf_dir" and fn == "load_float")


def serve_path(model: str) -> list[str]:
    from fastapi.testclient import TestClient

    from slmkit.serve.app import create_app
    from slmkit.serve.metrics import Metrics
    from slmkit.serve.registry import ModelRegistry

    def run() -> None:
        metrics = Metrics()
        registry = ModelRegistry([model], metrics, max_batch=4, max_queue=16, prefix_cache_tokens=4096)
        with TestClient(create_app(registry, metrics)) as client:
            r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 2, "temperature": 0,
                                                           "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text

    return trace(run, lambda mod, fn: mod in ENGINES and fn == "__init__")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["SLMKIT_HOME"] = home
        from slmkit.sources.importer import ensure_default

        model = ensure_default()
        out = {"prune": summary(prune_path(model)), "serve": summary(serve_path(model))}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    for name, s in out.items():
        print(f"{name}: {s['files']} files, {s['steps']} steps, {len(s['upward'])} upward")
        print("  " + " -> ".join(m.removeprefix("slmkit.") for m in s["path"]))
        for u in s["upward"]:
            print("  up: " + u)


if __name__ == "__main__":
    main()
