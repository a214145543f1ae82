"""Quality per byte (#31): slmkit's quantization-aware training onto a llama.cpp type's grid against llama.cpp's own
rounding of the same float model (plain, and with an importance matrix from the same calibration text), measured
with llama.cpp's own llama-perplexity under the issue's protocol: WikiText-2 test, -c 512 --chunks 40, 2 threads.
Calibration text (imatrix) and training text (QAT): the first WINDOWS x 512 tokens of WikiText-2 valid.

    BIN=$(.venv/bin/python bench/llama_tools.py --targets llama-perplexity)
    .venv/bin/python bench/quality_per_byte/run.py --data ../shared/data --llama-cpp-bin $BIN [--types Q4_0] [--steps 60]
        [--model NAME] [--work /tmp/slmkit-qpb]

Writes bench/results/quality_per_byte.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, cpu_line, exists, RESULTS, slmkit  # noqa: E402

WINDOWS, WINDOW = 60, 512  # calibration budget: the imatrix protocol (60 windows of 512 of wiki.valid)
THREADS = 2


def calibration(data: Path, work: Path, env: dict[str, str], model: str) -> Path:
    """The first WINDOWS x WINDOW tokens of WikiText-2 valid, as text."""
    from slmkit.sources.hf_dir import load_tokenizer
    from slmkit.store import Store

    out = work / "calib.txt"
    if not out.exists():
        tok = load_tokenizer(Store().require(model))
        text = (data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
        ids = tok.encode(text[: 40 * WINDOWS * WINDOW], add_special_tokens=False)[: WINDOWS * WINDOW]
        out.write_text(tok.decode(ids), encoding="utf-8")
    return out


def perplexity(binaries: Path, gguf: Path, text: Path) -> float:
    r = subprocess.run([str(binaries / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "512", "--chunks", "40",
                        "-t", str(THREADS)], capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(binaries)})
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if r.returncode or not m:
        raise RuntimeError(f"llama-perplexity failed on {gguf}:\n{(r.stdout + r.stderr)[-2000:]}")
    return float(m.group(1))


def export(model: str, gguf_type: str, out: Path, env: dict[str, str], *extra: str) -> Path:
    models = lambda: [p for p in out.glob("*.gguf") if p.name != "imatrix.gguf"]  # noqa: E731 (an imatrix export keeps its matrix beside)
    if not models():
        slmkit(["export", model, "--type", gguf_type, "--out", str(out), "--no-ppl", *extra], env)
    return models()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--llama-cpp-bin", type=Path, required=True, help="folder holding llama-perplexity (bench/llama_tools.py)")
    ap.add_argument("--types", nargs="+", default=["Q4_0"])
    ap.add_argument("--steps", type=int, default=60, help="QAT optimizer steps (4 windows of 256 tokens each)")
    ap.add_argument("--lr", type=float, default=2e-5, help="QAT peak learning rate")
    ap.add_argument("--alpha", type=float, default=1.0, help="QAT: weight of the KL to the float model (the rest: next-token loss)")
    ap.add_argument("--control", action="store_true", help="also the same training without the grid (a float twin), F32 and plain")
    ap.add_argument("--model", default=BASE)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmkit-qpb"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLMKIT_HOME": str(a.work / "home"), "PYTHONUNBUFFERED": "1"}
    os.environ["SLMKIT_HOME"] = env["SLMKIT_HOME"]
    slmkit(["models", "list"], env)  # the default model imported on first use
    calib = calibration(a.data, a.work, env, a.model)
    test = a.data / "wikitext2" / "wiki.test.raw"
    res: dict = {"cpu": cpu_line(), "model": a.model, "settings": {"steps": a.steps, "lr": a.lr, "alpha": a.alpha, "calibration_tokens": WINDOWS * WINDOW,
                 "protocol": "llama-perplexity, WikiText-2 test, -c 512 --chunks 40, 2 threads"}, "rows": []}

    def row(label: str, gguf: Path, **more) -> None:
        t0 = time.perf_counter()
        ppl = perplexity(a.llama_cpp_bin, gguf, test)
        res["rows"].append({"row": label, "mb": round(gguf.stat().st_size / 1e6, 1), "perplexity": ppl, **more})
        print(label, res["rows"][-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)

    row("F32", export(a.model, "F32", a.work / "f32", env))
    for t in a.types:
        row(f"{t} plain", export(a.model, t, a.work / f"{t}-plain", env))
        row(f"{t} imatrix", export(a.model, t, a.work / f"{t}-imatrix", env, "--imatrix", str(calib)))
        tag = f"lr{a.lr:g}" + (f"-a{a.alpha:g}" if a.alpha != 1.0 else "")
        name = f"qat-{t.lower()}-{tag}"
        seconds = None
        if not exists(name, env):
            t0 = time.perf_counter()
            slmkit(["quantize", a.model, "--scheme", f"gguf:{t}", "--method", "qat", "--data", str(calib), "--steps", str(a.steps),
                    "--lr", str(a.lr), "--alpha", str(a.alpha), "--name", name, "--no-ppl"], env)
            seconds = round(time.perf_counter() - t0, 1)
        card = json.loads(subprocess.run([sys.executable, "-m", "slmkit", "models", "show", name, "--json"], env=env,
                                         capture_output=True, text=True, check=True).stdout)
        row(f"{t} QAT (slmkit)", export(name, t, a.work / f"{t}-qat-{tag}", env), train_s=seconds or card["settings"]["seconds"],
            tokens=card["settings"]["tokens"], validation=card["settings"]["validation_perplexity"])
        if a.control:  # the same training without the grid: how much of QAT's number is the training text itself
            twin = f"float-twin-{tag}"
            if not exists(twin, env):
                slmkit(["distill", "--teacher", a.model, "--student", a.model, "--data", str(calib), "--steps", str(a.steps),
                        "--lr", str(a.lr), "--alpha", str(a.alpha), "--name", twin], env)
            row("float twin (same training, no grid) F32", export(twin, "F32", a.work / f"twin-{tag}-f32", env))
            row(f"float twin {t} plain", export(twin, t, a.work / f"twin-{tag}-{t}", env))
    f32 = res["rows"][0]["perplexity"]
    for r in res["rows"]:
        r["vs_f32"] = r["perplexity"] / f32 - 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "quality_per_byte" + (f"-alpha{a.alpha:g}" if a.alpha != 1.0 else "")  # a run with other QAT settings kept apart
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1))
    plot(res, RESULTS / f"{stem}.png")
    (RESULTS / f"{stem}.md").write_text(markdown(res, a.types).replace("quality_per_byte.png", f"{stem}.png"))
    print(markdown(res, a.types))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["rows"]:
        kind = "QAT" if "QAT" in r["row"] else "imatrix" if "imatrix" in r["row"] else "plain"
        ax.scatter(r["mb"], r["perplexity"], marker={"QAT": "*", "imatrix": "s", "plain": "o"}[kind], s=80)
        ax.annotate(r["row"], (r["mb"], r["perplexity"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("GGUF file (MB)")
    ax.set_ylabel("llama-perplexity, WikiText-2 test")
    ax.set_title(f"{res['model']}: bytes vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(res: dict, types: list[str]) -> str:
    s = res["settings"]
    lines = ["# quality per byte: QAT onto llama.cpp's grid vs llama.cpp's rounding", "",
             f"CPU: {res['cpu']}. Model: {res['model']}. Protocol: {s['protocol']}. Calibration (imatrix) and training (QAT) "
             f"text: the first {s['calibration_tokens']:,} tokens of WikiText-2 valid; QAT: {s['steps']} steps of 4 x 256 tokens "
             f"(KL to the float model's top-32, weight alpha {s['alpha']:g}, the rest next-token loss; lr {s['lr']:g}; block linear weights on the grid "
             "through a straight-through estimator, embeddings frozen).", "",
             "| row | file MB | perplexity | vs F32 | QAT training s (2 cores) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['row']} | {r['mb']:.1f} | {r['perplexity']:.3f} | {r['vs_f32']:+.1%} | {format(r['train_s'], '.0f') if r.get('train_s') else ''} |")
    lines += ["", "![bytes vs perplexity](quality_per_byte.png)", "", "## Targets", ""]
    by = {r["row"]: r for r in res["rows"]}
    for t in types:
        qat, imx = by[f"{t} QAT (slmkit)"]["vs_f32"], by[f"{t} imatrix"]["vs_f32"]
        lines.append(f"- {t}: QAT {qat:+.1%} vs imatrix {imx:+.1%}; target at most half of imatrix's ({imx / 2:+.1%}): "
                     f"{'met' if qat <= imx / 2 else 'not met'}")
        twin = by.get("float twin (same training, no grid) F32")
        if twin:
            q = by[f"{t} QAT (slmkit)"]["perplexity"]
            lines.append(f"- control: the same training without the grid reaches {twin['perplexity']:.3f} in F32 "
                         f"({twin['vs_f32']:+.1%}): QAT's {t} is {q / twin['perplexity'] - 1:+.1%} over its float twin, and "
                         f"the twin rounded plainly to {t} {by[f'float twin {t} plain']['perplexity'] / twin['perplexity'] - 1:+.1%}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
