"""The stage spine's seams: deriving a child into the store, walking a model, the one float loader and config
reader, the one backend registry, capabilities declared on the Backend protocol, and an import graph with no
circles and no imports of the package face from inside the package."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import slmkit
from slmkit.engine.backend import Backend
from slmkit.errors import SlmkitError
from slmkit.layers.walk import decoder_blocks, linear_layers, set_module
from slmkit.loading import open_backend, pick_backend
from slmkit.sources.hf_dir import load_float
from slmkit.card import read_config

SRC = Path(slmkit.__file__).parent


def test_derive_installs_a_child_with_its_lineage(store):
    def write(staging: Path) -> None:
        (staging / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (staging / "weights.bin").write_bytes(b"\0" * 10)

    card = store.derive("child", write, stage="prune", parent="tiny", settings={"sparsity": 0.5}, parameters=123)
    assert card.parent == "tiny" and card.stage == "prune" and card.settings == {"sparsity": 0.5}
    assert card.source == {"kind": "stage", "parent": "tiny"} and card.parameters == 123
    assert store.card("child").files.keys() == {"config.json", "weights.bin"}
    with pytest.raises(SlmkitError, match="already exists"):
        store.derive("child", write, stage="prune", parent="tiny")

    def broken(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"1")
        raise RuntimeError("disk full (simulated)")

    before = sorted(p.name for p in store.root.iterdir())
    with pytest.raises(RuntimeError):
        store.derive("other", broken, stage="prune", parent="tiny")
    assert sorted(p.name for p in store.root.iterdir()) == before


def test_walk_finds_blocks_and_linears_by_type(tiny_dir):
    model, _ = load_float(tiny_dir, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    name, blocks = decoder_blocks(model)
    assert blocks is model.model.layers and name == "model.layers" and len(blocks) == 2
    lins = linear_layers(model)
    assert len(lins) == 2 * 7 + 1  # q k v o gate up down per block, and the output head
    new = nn.Linear(32, 32, bias=False)
    set_module(model, "model.layers.0.self_attn.o_proj", new)
    assert model.model.layers[0].self_attn.o_proj is new

    class Wrapped(nn.Module):  # a wrapped model is walked the same way
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    assert decoder_blocks(Wrapped(model))[1] is blocks
    with pytest.raises(ValueError, match="no stack of decoder blocks"):
        decoder_blocks(nn.Linear(2, 2))


def test_read_config_says_what_is_wrong(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SlmkitError, match="not valid JSON"):
        read_config(tmp_path)
    with pytest.raises(SlmkitError, match="cannot read"):
        read_config(tmp_path / "nowhere")


def test_one_backend_registry(store, tiny_dir):
    folder = store.path("tiny")
    assert pick_backend(folder, "auto") == "torch"  # no GGUF in the folder
    with pytest.raises(SlmkitError, match="no GGUF"):
        pick_backend(folder, "llamacpp")
    with pytest.raises(SlmkitError, match="auto, torch, llamacpp"):
        pick_backend(folder, "onnx")
    backend = open_backend(folder, "torch")
    assert isinstance(backend, Backend)  # every capability the server and scheduler use is declared and present
    batch = backend.batch_store(2)
    assert batch.context is None
    batch.close()


def _module_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) imported at module level, outside `if TYPE_CHECKING:` blocks."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_import_graph_has_no_circles_and_never_climbs_to_the_package_face():
    modules = {".".join(("slmkit",) + p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps = set()
        for target, names in _module_imports(path):
            if target == "slmkit" and mod != "slmkit":
                face = [n for n in names if f"slmkit.{n}" not in modules]
                assert not face, f"{mod} imports {face} from the package face (slmkit/__init__.py)"
                deps |= {f"slmkit.{n}" for n in names}
            elif target in modules:
                deps.add(target)
                deps |= {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
        graph[mod] = deps - {mod}

    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if d == "slmkit":
                continue
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(d):] + [d]) if d in trail else d)
            if not state.get(d):
                visit(d, trail + [d])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


@pytest.mark.parametrize("batched", [False, True])
def test_the_decode_loop_hands_out_log_probabilities(store, batched):
    """Steps carry the log-probability a separate forward pass gives each generated token, and the top ones."""
    from slmkit.engine.scheduler import BatchedBackend

    model = slmkit.load("tiny")
    b = model.backend
    if batched:
        model = slmkit.Model("tiny", BatchedBackend(b, max_batch=2))
    gen = model.stream("The quick brown", temperature=0.8, seed=3, max_tokens=6, top_logprobs=3,
                       repetition_penalty=1.3)
    gen.read()
    ids = gen.token_ids
    assert len(gen.steps) == len(ids) >= 1
    rows = b.logprob_rows(gen.prompt_ids + ids)[len(gen.prompt_ids) - 1:]  # (n, V): a second pass, for the check
    for i, step in enumerate(gen.steps):
        assert step.logprob == pytest.approx(float(rows[i, step.token]), abs=1e-4)
        top_ids = rows[i].topk(3).indices.tolist()
        assert [t for t, _ in step.top] == top_ids and step.top[0][1] >= step.logprob - 1e-5
    if batched:
        model.backend.scheduler.stop()


def test_no_import_climbs_a_layer_counting_those_inside_functions():
    """tools/import_graph.py's layers (lowest first): every import, at module level or inside a function, goes to the
    module's own layer or below, and no modules form a circle."""
    import importlib.util

    path = SRC.parents[1] / "tools" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    r = graph.report()
    assert r["circles"] == [] and r["upward"] == [], r
    assert r["imports_in_functions"] > 0  # they are read: the count covers them


def test_a_model_name_reaches_its_weights_and_engine_in_few_files_without_climbing(store):
    """tools/call_paths.py on the tiny model: `slmkit prune` reaches the float weights through the CLI, its stage and
    the loader, never calling back up a layer; a served request reaches the built engine through the registry and
    loading, and the only step up is the scheduler's thread calling the loader the registry handed it."""
    import importlib.util
    import sys

    tools = SRC.parents[1] / "tools"
    sys.path.insert(0, str(tools))
    try:
        spec = importlib.util.spec_from_file_location("call_paths", tools / "call_paths.py")
        paths = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(paths)
    finally:
        sys.path.remove(str(tools))
    prune = paths.summary(paths.prune_path("tiny"))
    assert prune["path"][-1] == "slmkit.sources.hf_dir" and "slmkit.cli.prune" in prune["path"], prune
    assert prune["upward"] == [] and prune["files"] <= 5, prune
    serve = paths.summary(paths.serve_path("tiny"))
    assert serve["path"][-1] in paths.ENGINES and "slmkit.loading" in serve["path"], serve
    assert serve["upward"] == ["slmkit.engine.scheduler -> slmkit.serve.registry"] and serve["files"] <= 5, serve


def test_every_cli_default_is_its_stage_default():
    """A command's option and its stage's keyword of the same name have one default (written once, read by the
    other): the CLI never silently runs a stage with other settings than its Python API. An option whose default is
    None leaves it to the stage (which picks by mode: prune's method, fine-tuning's learning rate per method)."""
    import inspect

    from slmkit.cli import distill as c_distill, evaluate as c_eval, export as c_export, finetune as c_finetune
    from slmkit.cli import lowrank as c_lowrank, mix as c_mix, prune as c_prune, quantize as c_quantize, route as c_route
    from slmkit.compress.lowrank_stage import lowrank_stage
    from slmkit.compress.prune_stage import prune_stage, shrink_stage
    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.evaluate.run import evaluate
    from slmkit.export.store_export import export_model
    from slmkit.route.calibrate import calibrate_stage
    from slmkit.route.mix import mix_stage
    from slmkit.train.distill import distill_stage
    from slmkit.train.finetune import finetune_stage
    from slmkit.train.loop import TrainConfig

    train = {f.name: f.default for f in __import__("dataclasses").fields(TrainConfig)}
    pairs = [(c_quantize.quantize, [quantize_stage]), (c_prune.prune, [prune_stage, shrink_stage]), (c_lowrank.lowrank, [lowrank_stage]),
             (c_distill.distill, [distill_stage]), (c_finetune.finetune, [finetune_stage]), (c_export.export, [export_model]),
             (c_route.calibrate, [calibrate_stage]), (c_eval.eval_cmd, [evaluate]), (c_mix.mix, [mix_stage])]
    checked, wrong = 0, []
    for cli, stages in pairs:
        for name, p in inspect.signature(cli).parameters.items():
            if p.default is inspect.Parameter.empty or p.default is None:
                continue
            want = [s_p.default for s in stages for n, s_p in inspect.signature(s).parameters.items()
                    if n == name and s_p.default is not inspect.Parameter.empty]
            if name in train and stages[0] in (distill_stage, finetune_stage):
                want.append(train[name])
            for w in want:
                checked += 1
                if p.default != w:
                    wrong.append(f"{cli.__module__}.{cli.__name__} --{name}: {p.default!r} vs the stage's {w!r}")
    assert checked > 40 and not wrong, wrong
