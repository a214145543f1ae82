"""Low-rank factorization: the whitened SVD against its definition, and the stage on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.compress import lowrank_ops as lo
from slmkit.compress.lowrank_stage import lowrank_stage
from slmkit.errors import SlmkitError
from slmkit.layers.lowrank import LowRankLinear

runner = CliRunner()


def test_whitened_svd_beats_plain_svd_on_the_output_error():
    torch.manual_seed(0)
    x = torch.randn(2000, 48) * torch.linspace(0.05, 3, 48)  # inputs with very uneven channel scales (T, K)
    w = torch.randn(40, 48)
    h = x.T @ x / x.shape[0]
    s = lo.whitening(h, damp=1e-6)
    assert torch.allclose(s @ s.T, h.double(), rtol=1e-3, atol=1e-4)
    up, down = lo.factors(*lo.whitened_svd(w, s), 12)
    assert up.shape == (40, 12) and down.shape == (12, 48)
    u, sv, vt = torch.linalg.svd(w)
    plain = (u[:, :12] * sv[:12]) @ vt[:12]
    err = lambda approx: float((x @ (w - approx).T).square().mean())  # noqa: E731
    assert err(up @ down) < 0.8 * err(plain)
    full_up, full_down = lo.factors(*lo.whitened_svd(w, s), 40)  # full rank gives W back
    assert torch.allclose(full_up @ full_down, w, atol=1e-3)


def test_energy_rank_and_allocation():
    sv = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert lo.energy_rank(sv, 0.5) == 1 and lo.energy_rank(sv, 0.9) == 2 and lo.energy_rank(sv, 0.999) == 4
    spectra = {"a": (torch.tensor([10.0, 1.0, 0.1]), 4, 4), "b": (torch.tensor([1.0, 1.0, 1.0]), 4, 4)}
    ranks = lo.allocate_ranks(spectra, budget=8 * 3)
    assert ranks == {"a": 1, "b": 2}  # a's first direction holds 99% of its energy; then b's


def test_lowrank_child_is_smaller_counts_honestly_and_loads_back(wide, calib):
    parent = slmkit.Store().card(wide)
    card = lowrank_stage(wide, ratio=0.8, calib=calib, samples=4, window=32)
    child = slmkit.load(card.name)
    net = child.backend.model
    assert any(isinstance(m, LowRankLinear) for m in net.modules())
    assert card.parameters == sum(p.numel() for p in net.parameters()) <= 0.8 * parent.parameters
    assert card.settings["params_after"] == card.parameters and card.settings["factorized"] >= 1
    assert card.weights_bytes["safetensors"] < parent.weights_bytes["safetensors"]
    assert child.backend.fast is not None  # the lean forward calls the factorized layers as they are
    ids = child.backend.encode("The quick brown fox")
    lean = child.backend.fast.forward(child.backend.fast.new_cache(1), torch.tensor([ids]))[0]
    assert torch.allclose(lean, net(input_ids=torch.tensor([ids])).logits[0, -1], atol=1e-4)
    assert child.generate("The quick", max_tokens=4, temperature=0)


def test_lowrank_output_stays_close_to_the_parent(wide, calib):
    near = slmkit.load(lowrank_stage(wide, energy=0.999, calib=calib, samples=4, window=32).name).backend.model
    far = slmkit.load(lowrank_stage(wide, ratio=0.6, calib=calib, samples=4, window=32).name).backend.model
    ref = slmkit.load(wide).backend.model
    ids = torch.tensor([slmkit.load(wide).backend.encode("Paris is the capital of France.")])
    with torch.no_grad():
        base = ref(input_ids=ids).logits
        d_near = (near(input_ids=ids).logits - base).abs().mean()
        d_far = (far(input_ids=ids).logits - base).abs().mean()
    assert d_near < 0.25 * d_far


def test_export_multiplies_back_and_says_so(wide, calib, tmp_path):
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.sampling import SamplingParams
    from slmkit.export.store_export import export_model

    name = lowrank_stage(wide, ratio=0.7, calib=calib, samples=4, window=32).name
    res = export_model(name, "F32", out_dir=tmp_path / "out", store_as=f"{name}-f32")
    assert "multiplied back" in res["note"]
    torch_b = slmkit.load(name).backend
    cpp = LlamaCppBackend(tmp_path / "out" / f"{name}-f32.gguf", threads=2)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    ids = torch_b.encode("The quick brown fox")
    assert list(cpp.stream_tokens(ids, greedy, 10)) == list(torch_b.stream_tokens(ids, greedy, 10))
    cpp.close()
    assert slmkit.load(f"{name}-f32", backend="llamacpp").generate("The quick", max_tokens=3, temperature=0) is not None
    assert not list(slmkit.Store().root.parent.glob(".slmkit-dense-*"))  # the temporary dense copy is gone


def test_lowrank_cli_and_bad_input(wide, calib):
    r = runner.invoke(app, ["lowrank", wide, "--ratio", "0.8", "--calib", str(calib), "--samples", "4", "--window", "32", "--no-ppl"])
    assert r.exit_code == 0, r.output
    assert "layers factorized" in r.stdout
    for args, message in [
        (["lowrank", wide, "--ratio", "1.5"], "outside (0, 1)"),
        (["lowrank", wide], "give one of --ratio"),
        (["lowrank", wide, "--ratio", "0.05", "--calib", str(calib), "--samples", "4", "--window", "32"], "leaves no room"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
    from slmkit.compress.quantize_stage import quantize_stage

    made = [n for n in slmkit.Store().names() if "lowrank" in n][0]
    with pytest.raises(SlmkitError, match="factorized"):
        quantize_stage(made, "int8")
