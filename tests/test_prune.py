"""Pruning: the math against direct computations, and the stages on a tiny random Llama (a real store, real files)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import snapshot
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.compress import prune_ops as po
from slmkit.compress.prune_stage import parse_count, prune_stage, scan, shrink_stage
from slmkit.errors import SlmkitError

runner = CliRunner()


# ---- math ---------------------------------------------------------------------------------------------------------
def test_row_and_nm_masks():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 9.0, 7.0, 8.0]])
    assert po.row_mask(scores, 0.5).tolist() == [[True, False, False, False, False, True, True, True]]
    assert po.nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, False, True]]
    with pytest.raises(ValueError, match="divisible by 3"):
        po.nm_mask(scores, 1, 3)
    assert po.parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError):
            po.parse_pattern(bad)


def test_wanda_scores_weigh_weights_by_input_norms():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    x = torch.tensor([[1.0, 0.1], [2.0, 0.2]])  # (T, K): channel 0 is large, channel 1 small
    norm = x.norm(dim=0)
    assert torch.allclose(po.wanda_scores(w, norm), w.abs() * norm)
    keep = po.row_mask(po.wanda_scores(w, norm), 0.5)
    assert keep.tolist() == [[True, False], [True, False]]  # magnitude alone would keep -2.0 in row 0


def test_wanda_loss_share():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    x = torch.tensor([1.0, 1.0, 1.0, 2.0])  # scores 1, 2, 3, 8: half the row removes 1 + 2 of 14
    assert po.wanda_loss_share(w, x, 0.5) == pytest.approx(3 / 14)


def test_sparsegpt_prunes_exactly_and_beats_magnitude_on_the_layer_output():
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs (T, K)
    w = torch.randn(32, 64)
    h = 2 * x.T @ x / x.shape[0]
    pruned = po.sparsegpt(w, h, sparsity=0.5, block=16)
    assert po.sparsity_of(pruned) == pytest.approx(0.5, abs=0.01)
    nm = po.sparsegpt(w, h, nm=(2, 4), block=16)
    assert (nm.reshape(32, 16, 4) != 0).sum(-1).max() <= 2
    mag = w * po.row_mask(w.abs(), 0.5)
    err = lambda p: float((x @ (w - p).T).square().mean())  # noqa: E731
    assert err(pruned) < 0.7 * err(mag)


def test_block_influence():
    a = torch.randn(10, 8)
    assert torch.allclose(po.block_influence(a, a), torch.zeros(10), atol=1e-6)
    assert torch.allclose(po.block_influence(a, -a), torch.full((10,), 2.0), atol=1e-6)


def test_parse_count():
    assert parse_count("70M") == 70_000_000 and parse_count("1.5B") == 1_500_000_000 and parse_count("1234") == 1234
    with pytest.raises(SlmkitError):
        parse_count("lots")


# ---- stages -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_child_has_the_sparsity_it_claims(wide, calib, method):
    card = prune_stage(wide, method=method, sparsity=0.5, calib=None if method == "magnitude" else calib, samples=4, window=32)
    child = slmkit.load(card.name)
    net = child.backend.model
    lins = [m for b in net.model.layers for m in b.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in lins) / sum(m.weight.numel() for m in lins)
    assert zeros == pytest.approx(0.5, abs=0.01)
    assert card.settings["measured"]["linear_sparsity"] == pytest.approx(zeros)
    assert card.parent == wide and card.stage == "prune" and "dense file" in card.settings["storage"]
    assert net.lm_head.weight.count_nonzero() == net.lm_head.weight.numel()  # the output head is left alone
    assert child.generate("The quick", max_tokens=4, temperature=0)  # it still runs


def test_nm_child_and_eval_report_sparsity(wide, calib, tmp_path):
    card = prune_stage(wide, method="wanda", pattern="2:4", calib=calib, samples=4, window=32)
    w = slmkit.load(card.name).backend.model.model.layers[0].mlp.up_proj.weight
    assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", card.name, "--ppl", str(calib), "--context-length", "32", "--limit", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["results"]["sparsity"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_depth_pruning_drops_the_least_influential_blocks(wide, calib):
    parent = slmkit.load(wide).backend.model
    per_block = sum(p.numel() for p in parent.model.layers[0].parameters())
    total = slmkit.Store().card(wide).parameters
    card = shrink_stage(wide, structured="depth", target_params=total - per_block, calib=calib, samples=4, window=32)
    s = card.settings
    scores = s["block_importance"]
    assert len(s["dropped_blocks"]) == 1 and s["dropped_blocks"][0] == min(range(4), key=lambda i: scores[i])
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(slmkit.Store().path(card.name)))  # plain transformers loads it
    assert plain.config.num_hidden_layers == 3 and len(plain.model.layers) == 3
    assert card.parameters == sum(p.numel() for p in plain.parameters()) == total - per_block
    kept = [i for i in range(4) if i not in s["dropped_blocks"]]
    for new_i, old_i in enumerate(kept):  # the kept blocks are unchanged
        assert torch.equal(plain.model.layers[new_i].mlp.down_proj.weight, parent.model.layers[old_i].mlp.down_proj.weight)
    _lean_matches_transformers(card.name)


def test_width_pruning_keeps_a_consistent_llama(wide, calib):
    before = slmkit.Store().card(wide).parameters
    card = shrink_stage(wide, structured="width", target_params=int(before * 0.75), calib=calib, samples=4, window=32)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(slmkit.Store().path(card.name)))
    cfg = plain.config
    assert cfg.intermediate_size < 64 and cfg.intermediate_size % 32 == 0 and cfg.head_dim == 8
    assert card.parameters == sum(p.numel() for p in plain.parameters()) <= before * 0.75
    assert card.settings["intermediate_size"] == [64, cfg.intermediate_size]
    _lean_matches_transformers(card.name)


def test_width_pruning_removes_whole_kv_groups(wide, calib):
    """A target the MLP alone cannot reach takes a KV group (its KV head and its query heads) too."""
    before = slmkit.Store().card(wide).parameters
    card = shrink_stage(wide, structured="width", target_params=int(before * 0.66), calib=calib, samples=4, window=32)
    cfg = slmkit.load(card.name).backend.model.config
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2
    _lean_matches_transformers(card.name)


def _lean_matches_transformers(name: str) -> None:
    """slmkit's lean Llama forward and transformers' forward agree on the pruned child."""
    b = slmkit.load(name).backend
    assert b.fast is not None
    ids = b.encode("The quick brown fox jumps")
    cache = b.fast.new_cache(1)
    lean = b.fast.forward(cache, torch.tensor([ids]))[0]
    ref = b.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(lean, ref, atol=1e-4)


def test_scan_reports_every_block(wide, calib):
    result = scan(wide, calib=calib, samples=4, window=32)
    assert len(result["blocks"]) == 4
    for b in result["blocks"]:
        assert b["perplexity_without"] > 0 and 0 <= b["influence"] <= 2
    assert any(abs(b["cost"]) > 1e-4 for b in result["blocks"])
    layers = result["layers"]
    assert sorted(layers) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert all(len(v) == 4 and all(0 < x < 0.5 for x in v) for v in layers.values())  # the lowest half of each row goes


def test_prune_cli_and_bad_input(wide, calib, tmp_path):
    root = slmkit.Store().root
    before = snapshot(root)
    for args, message in [
        (["prune", wide, "--method", "wanda", "--sparsity", "1.5"], "outside (0, 1)"),
        (["prune", wide, "--method", "wanda", "--pattern", "2:3", "--calib", str(calib)], "divisible by 3"),
        (["prune", wide, "--method", "nope", "--sparsity", "0.5"], "unknown method"),
        (["prune", wide, "--structured", "depth", "--target-params", "10"], "leaves no decoder block"),
        (["prune", wide, "--structured", "width", "--blocks", "2"], "--blocks applies to"),
        (["prune", wide, "--structured", "depth", "--target-params", "10G"], "cannot read"),
        (["prune", wide, "--structured", "depth", "--target-params", "999M"], "not below"),
        (["prune", wide, "--structured", "width", "--ratio", "0.7", "--samples", "2"], "too few"),
        (["prune", wide], "nothing to do"),
        (["prune", wide, "--method", "wanda", "--sparsity", "0.5", "--structured", "depth"], "choose one kind"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
    assert snapshot(root) == before
    html = tmp_path / "scan.html"
    r = runner.invoke(app, ["prune", wide, "--scan", "--calib", str(calib), "--samples", "4", "--window", "32", "--html", str(html)])
    assert r.exit_code == 0, r.output
    assert "influence" in r.stdout and "data:image/png;base64," in html.read_text()
    r = runner.invoke(app, ["prune", wide, "--structured", "depth", "--ratio", "0.8", "--calib", str(calib), "--samples", "4",
                            "--window", "32", "--name", "wide-d3", "--no-ppl"])
    assert r.exit_code == 0, r.output
    assert "made wide-d3" in r.stdout
    r = runner.invoke(app, ["prune", "wide-d3", "--structured", "depth", "--ratio", "0.8", "--samples", "4", "--no-ppl"])
    assert r.exit_code == 0, r.output  # the packaged calibration text by default; a pruned child prunes again


def test_quantized_models_are_refused(wide):
    from slmkit.compress.quantize_stage import quantize_stage

    q = quantize_stage(wide, "int8").name
    with pytest.raises(SlmkitError, match="no plain float weights"):
        prune_stage(q, method="magnitude", sparsity=0.5)


@pytest.mark.parametrize("structured, keep", [("depth", 0.8), ("width", 0.66)])
def test_structured_children_export_to_gguf_that_llamacpp_runs(wide, calib, tmp_path, structured, keep):
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.sampling import SamplingParams
    from slmkit.export.gguf import export_gguf

    before = slmkit.Store().card(wide).parameters
    card = shrink_stage(wide, structured=structured, target_params=int(before * keep), calib=calib, samples=4, window=32)
    folder = slmkit.Store().path(card.name)
    gguf = export_gguf(folder, tmp_path / "out", name="child", gguf_type="F32")
    torch_b = slmkit.load(card.name).backend
    cpp_b = LlamaCppBackend(gguf, threads=2)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    for text in ("The quick brown fox", "Paris is the capital of"):
        ids = torch_b.encode(text)
        assert list(cpp_b.stream_tokens(ids, greedy, 12)) == list(torch_b.stream_tokens(ids, greedy, 12))
    cpp_b.close()


def test_stages_compose_prune_then_quantize_then_export(wide, calib):
    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.export.store_export import export_model

    pruned = shrink_stage(wide, structured="width", target_params=int(slmkit.Store().card(wide).parameters * 0.75),
                          calib=calib, samples=4, window=32).name
    q = quantize_stage(pruned, "int8")
    assert q.parent == pruned and slmkit.Store().card(pruned).parent == wide  # the lineage runs back to the base
    assert slmkit.load(q.name).generate("The quick", max_tokens=3, temperature=0) is not None
    res = export_model(pruned, "Q8_0", store_as=f"{pruned}-q8")
    assert res["store_name"] and slmkit.load(f"{pruned}-q8", backend="llamacpp").generate("The", max_tokens=3, temperature=0) is not None


def test_depth_by_perplexity_cost_drops_the_cheapest_block(wide, calib):
    card = shrink_stage(wide, structured="depth", blocks=1, rank="perplexity", calib=calib, samples=4, window=32)
    s = card.settings
    assert s["rank"] == "perplexity" and s["dropped_blocks"] == [min(range(4), key=lambda i: s["block_importance"][i])]
    assert scan(wide, calib=calib, samples=4, window=32)["blocks"][s["dropped_blocks"][0]]["perplexity_without"] == \
        pytest.approx(min(s["block_importance"]), rel=1e-4)
