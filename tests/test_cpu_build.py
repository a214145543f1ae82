"""Every x86-64 machine: llama.cpp's build flags from recorded CPU flag sets, the child-process guard that keeps a
crashing build from killing the user's process, and `slmkit doctor`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmkit import cpu_build, doctor, progress
from slmkit.cli import app
from slmkit.engine import llamacpp_guard
from slmkit.engine.sampling import SamplingParams
from slmkit.errors import SlmkitError
from slmkit.loading import pick_backend

runner = CliRunner()

COMMON = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx "
          "pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology cpuid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 "
          "x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 erms invpcid")
# recorded from the machines the issue names (lscpu's Flags), trimmed of flags no option reads
XEON_SPR = COMMON + (" avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl "
                     "xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke waitpkg "
                     "avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid movdiri movdir64b "
                     "fsrm md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities")
EPYC_ZEN4 = COMMON + (" avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl "
                      "xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni "
                      "vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm")
HASWELL = COMMON + " xsaveopt arat"
NEHALEM = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm pni ssse3 cx16 sse4_1 sse4_2 popcnt"
KNL = COMMON + " avx512f avx512cd avx512pf avx512er"  # Knights Landing: AVX-512F without VL/BW/DQ


def opts(flags: str, **kw) -> dict[str, bool]:
    return cpu_build.ggml_options(frozenset(flags.split()), **kw)


def on(flags: str, **kw) -> set[str]:
    return {k for k, v in opts(flags, **kw).items() if v}


def test_xeon_with_amx_gets_avx512_but_no_amx_path_unless_asked():
    assert on(XEON_SPR) == {"GGML_SSE42", "GGML_AVX", "GGML_F16C", "GGML_FMA", "GGML_AVX2", "GGML_BMI2", "GGML_AVX_VNNI",
                            "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}
    assert {"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"} <= on(XEON_SPR, amx=True)
    args = cpu_build.cmake_args(cpu_build.Cpu("Xeon", "x86_64", frozenset(XEON_SPR.split())))
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args and "-DGGML_AVX512_VNNI=ON" in args
    assert not any(a.startswith("-march") for a in args)


def test_epyc_haswell_and_older_cpus():
    assert on(EPYC_ZEN4) == on(XEON_SPR) - {"GGML_AVX_VNNI"}  # Zen 4 lists no AVX-VNNI (VEX), all of AVX-512's
    assert on(EPYC_ZEN4, amx=True) == on(EPYC_ZEN4)  # asking for AMX where the CPU has none changes nothing
    assert on(HASWELL) == {"GGML_SSE42", "GGML_AVX", "GGML_F16C", "GGML_FMA", "GGML_AVX2", "GGML_BMI2"}
    assert on(NEHALEM) == {"GGML_SSE42"}  # every other option said OFF (ggml's defaults would turn AVX2 on)
    assert set(opts(NEHALEM)) == set(opts(XEON_SPR, amx=True))  # every option is said explicitly
    # AVX-512F without the VL/BW/DQ that ggml's GGML_AVX512 compiles for: no AVX-512 at all, nor its extensions
    assert not {o for o in on(KNL) if "AVX512" in o}


def test_cmake_args_elsewhere_and_the_users_own_args_last():
    arm = cpu_build.Cpu("Neoverse", "aarch64", frozenset("fp asimd sve".split()))
    assert cpu_build.cmake_args(arm) == list(cpu_build.BUILD_CUTS)  # llama.cpp's own defaults off x86
    x86 = cpu_build.Cpu("Haswell", "x86_64", frozenset(HASWELL.split()))
    args = cpu_build.cmake_args(x86, extra="-DGGML_BLAS=ON -DGGML_AVX2=OFF")
    assert args[-2:] == ["-DGGML_BLAS=ON", "-DGGML_AVX2=OFF"]  # cmake takes the last -D: the user's choice wins


def test_build_key_names_the_version_flags_and_python(tmp_path):
    a = cpu_build.build_key("0.3.36", ["-DGGML_AVX2=ON"], "cp311")
    assert a == cpu_build.build_key("0.3.36", ["-DGGML_AVX2=ON"], "cp311")
    assert len({a, cpu_build.build_key("0.3.35", ["-DGGML_AVX2=ON"], "cp311"),
                cpu_build.build_key("0.3.36", ["-DGGML_AVX2=OFF"], "cp311"),
                cpu_build.build_key("0.3.36", ["-DGGML_AVX2=ON"], "cp312")}) == 4
    constraints = tmp_path / "c.txt"
    constraints.write_text("# pins\ntorch==2.13.0\nllama_cpp_python == 0.3.36  # built per CPU\n")
    assert cpu_build.pinned_version(constraints) == "0.3.36"
    constraints.write_text("torch==2.13.0\n")
    assert cpu_build.pinned_version(constraints) is None


def test_read_cpu_from_a_recorded_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: {XEON_SPR}\n\n"
                    f"processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: {XEON_SPR}\n")
    cpu = cpu_build.read_cpu(info)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8481C" and cpu.has_amx and "avx512_vnni" in cpu.flags
    assert cpu_build.cpu_id(cpu).startswith("Intel(R) Xeon(R) Platinum 8481C ")
    assert cpu_build.read_cpu(tmp_path / "absent").flags == frozenset()


def test_machine_cache_setting(tmp_path):
    assert cpu_build.machine_cache({"SLMKIT_MACHINE_CACHE": str(tmp_path)}) == tmp_path
    assert cpu_build.machine_cache({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "slmkit-machine"


def test_os_state_agrees_with_the_flags_linux_lists():
    state, cpu = cpu_build.os_state(), cpu_build.read_cpu()
    assert set(state) == {"xfeatures", "avx", "avx512", "amx", "amx_permitted"}
    if state["xfeatures"] is None:
        pytest.skip("not x86-64 Linux")
    # Linux lists AVX / AVX-512 only where it saves their registers
    assert state["avx"] == ("avx" in cpu.flags) and state["avx512"] == ("avx512f" in cpu.flags)
    if not cpu.has_amx:
        assert state["amx_permitted"] is False


# --- the guard ---------------------------------------------------------------------------------------------------
@pytest.fixture
def guard_cache(tmp_path, monkeypatch) -> Path:
    """A private machine cache, and no verdict remembered in this process."""
    monkeypatch.setenv("SLMKIT_MACHINE_CACHE", str(tmp_path / "machine"))
    llamacpp_guard.check.cache_clear()
    yield tmp_path / "machine"
    llamacpp_guard.check.cache_clear()


CRASH = "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"


def test_guard_sees_a_build_die_in_a_child_and_keeps_the_verdict(guard_cache, monkeypatch):
    monkeypatch.setattr(llamacpp_guard, "PROBE", CRASH)
    verdict = llamacpp_guard.check()
    assert not verdict.ok and "SIGILL" in verdict.detail and "illegal instruction" in verdict.detail
    assert verdict.build and verdict.cpu == cpu_build.cpu_id()
    kept = json.loads((guard_cache / llamacpp_guard.GUARD_FILE).read_text())
    assert kept[f"{verdict.build}|{verdict.cpu}"]["ok"] is False
    # the next process reads the verdict back: no second child
    llamacpp_guard.check.cache_clear()
    monkeypatch.setattr(llamacpp_guard, "probe", lambda *a, **k: pytest.fail("probed again"))
    assert llamacpp_guard.check() == verdict
    with pytest.raises(SlmkitError, match="does not run on this CPU") as err:
        llamacpp_guard.require()
    assert "CMAKE_ARGS=" in err.value.hint and "GGML_NATIVE=OFF" in err.value.hint and "--backend torch" in err.value.hint


def test_guard_describes_other_endings(tmp_path):
    gguf = tmp_path / "x.gguf"
    assert llamacpp_guard.probe(gguf, 1, "raise SystemExit('no model here')") == (False, "exited with code 1: no model here")
    ok, detail = llamacpp_guard.probe(gguf, 1, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert not ok and "SIGSEGV" in detail
    assert llamacpp_guard.probe(gguf, 1, "print('ok')")[0]
    assert llamacpp_guard.describe_exit(-int(signal.SIGILL), "", "").startswith("killed by SIGILL")


@pytest.fixture
def tiny_gguf_model(store, tmp_path):
    """The tiny model with a Q8_0 GGUF beside its weights, as `auto` would run on llama.cpp."""
    from slmkit.export.gguf import export_gguf

    folder = store.path("tiny")
    gguf = export_gguf(folder, tmp_path / "gguf", name="tiny", gguf_type="Q8_0")
    (folder / gguf.name).write_bytes(gguf.read_bytes())
    return folder


def test_a_crashing_build_falls_back_to_torch_and_never_kills_the_process(guard_cache, tiny_gguf_model, monkeypatch):
    assert pick_backend(tiny_gguf_model, "auto") == "llamacpp"  # the real build runs here
    llamacpp_guard.check.cache_clear()
    monkeypatch.setenv("SLMKIT_MACHINE_CACHE", str(guard_cache / "other"))
    monkeypatch.setattr(llamacpp_guard, "PROBE", CRASH)
    monkeypatch.setattr(progress, "_console", None)  # library use (an earlier CLI test may have enabled the console)
    with pytest.warns(RuntimeWarning, match="llama.cpp does not run on this CPU.*using the PyTorch engine"):
        assert pick_backend(tiny_gguf_model, "auto") == "torch"
    from slmkit.engine.llamacpp_backend import LlamaCppBackend

    with pytest.raises(SlmkitError, match="does not run on this CPU"):
        LlamaCppBackend.from_folder(tiny_gguf_model)
    # the CLI: `run` (auto) answers on PyTorch with one warning line; naming llama.cpp is an error, exit 1
    r = runner.invoke(app, ["run", "tiny", "--temperature", "0", "-n", "4", "hello"])
    assert r.exit_code == 0, r.output
    assert "llama.cpp does not run on this CPU" in r.stderr and "Loading tiny (torch)" in r.stderr
    r = runner.invoke(app, ["run", "tiny", "--backend", "llamacpp", "-n", "4", "hello"])
    assert r.exit_code == 1 and "does not run on this CPU" in r.stderr and "Traceback" not in r.output


def test_guard_can_be_turned_off(guard_cache, monkeypatch):
    monkeypatch.setenv("SLMKIT_LLAMACPP_GUARD", "0")
    monkeypatch.setattr(llamacpp_guard, "probe", lambda *a, **k: pytest.fail("probed with the guard off"))
    assert llamacpp_guard.check().ok


def test_the_real_build_decodes_a_multi_token_prompt(guard_cache):
    """What ggml's crashing AMX path needs to be reached: a prompt of many tokens in one batch, then decoding; in a
    child (the guard) and in this process through the llama.cpp engine."""
    verdict = llamacpp_guard.check()
    assert verdict.ok, verdict.detail
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.sources.packaged import default_gguf

    backend = LlamaCppBackend(default_gguf()[0], threads=2, n_ctx=256)
    ids = backend.encode("A small language model reads a prompt of many tokens in one batch and then writes its "
                         "answer one token at a time, which is where every matrix kernel runs.")
    assert len(ids) > 16
    out = list(backend.stream_tokens(ids, SamplingParams(temperature=0), 8))
    assert len(out) == 8
    backend.close()


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None or cpu_build.read_cpu().arch != "x86_64",
                    reason="needs Debian's qemu-user on x86-64 (apt-get install qemu-user; .ci/run installs it)")
def test_guard_catches_a_real_illegal_instruction_on_an_emulated_cpu():
    """qemu-user's Haswell runs AVX2 but no AVX-512, while /proc/cpuinfo under it still lists the host's flags: only
    running the code tells. The installed build (made for this machine) dies there exactly when it uses AVX-512."""
    from slmkit.sources.packaged import default_gguf

    info = subprocess.run([sys.executable, "-c", doctor.SYSTEM_INFO], capture_output=True, text=True, check=True).stdout
    avx512 = any(on for name, on in doctor.llama_features(info).items() if name.startswith("AVX512") or name == "AMX_INT8")
    ok, detail = llamacpp_guard.probe(default_gguf()[0], 2, launcher=(QEMU, "-cpu", "Haswell"))
    if avx512:
        assert not ok and "SIGILL" in detail, detail
    else:
        assert ok, detail


# --- doctor ------------------------------------------------------------------------------------------------------
def features(**on: int) -> dict[str, bool]:
    base = dict.fromkeys(doctor.LLAMA_FEATURES, False)
    return {**base, **{k: bool(v) for k, v in on.items()}}


def test_doctor_compares_a_build_with_the_cpu():
    xeon, haswell, epyc = (frozenset(f.split()) for f in (XEON_SPR, HASWELL, EPYC_ZEN4))
    native_spr = features(SSE3=1, SSSE3=1, AVX=1, AVX2=1, F16C=1, FMA=1, BMI2=1, AVX_VNNI=1, AVX512=1, AVX512_VBMI=1,
                          AVX512_VNNI=1, AVX512_BF16=1, AMX_INT8=1)
    problems = doctor.compare_build(native_spr, xeon, amx_opt_in=False)
    assert len(problems) == 1 and "AMX" in problems[0].what and "make install" in problems[0].fix
    assert doctor.compare_build(native_spr, xeon, amx_opt_in=True) == []
    missing = doctor.compare_build(native_spr, haswell, amx_opt_in=False)
    assert "lacks" in missing[0].what and "AVX512" in missing[0].what and "AMX_INT8" in missing[0].what
    generic = features(SSE3=1, SSSE3=1, AVX=1, AVX2=1, F16C=1, FMA=1, BMI2=1)
    slow = doctor.compare_build(generic, epyc, amx_opt_in=False)
    assert len(slow) == 1 and "does not use" in slow[0].what and "AVX512_VNNI" in slow[0].what
    assert doctor.compare_build(generic, haswell, amx_opt_in=False) == []
    parsed = doctor.llama_features("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | AMX_INT8 = 0 | LLAMAFILE = 1 | ")
    assert parsed["SSE3"] and parsed["AVX2"] and not parsed["AVX512"] and not parsed["AMX_INT8"]


def test_doctor_reports_this_machine_and_a_broken_store_folder(store, guard_cache):
    bad = store.root / "half-written"
    bad.mkdir()
    (bad / "card.json").write_text('{"name":')
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["cpu"]["model"] and report["cpu"]["arch"] and report["cpu"]["cores"] >= 1
    assert report["cpu"]["os"]["avx"] in (True, None)
    assert set(report["cpu"]["features"]) <= set(doctor.RELEVANT)
    llama = report["llama_cpp"]
    assert llama["installed"] and llama["version"] and llama["guard"]["ok"] is True
    assert "AVX2" in llama["features"] or cpu_build.read_cpu().arch != "x86_64" or "avx2" not in report["cpu"]["features"]
    assert report["torch"]["version"] and report["torch"]["threads"] >= 1
    assert "tiny" in report["store"]["models"] and report["store"]["free_bytes"] > 0
    assert [b["name"] for b in report["store"]["broken"]] == ["half-written"]
    assert any("half-written" in p["what"] and "slmkit models rm half-written" in p["fix"] for p in report["problems"])
    assert {"wikitext2", "arc_easy"} <= {d["name"] for d in report["data"] if d["found"] == "packaged"}
    r = runner.invoke(app, ["doctor", "--no-probe"])
    assert r.exit_code == 0, r.output
    assert "CPU" in r.stdout and "llama.cpp" in r.stdout and "runs here" in r.stdout and "fix: slmkit models rm" in r.stdout
