"""`slmkit route calibrate`: measure the small and the large model on a labelled dev set, draw quality against the
share escalated for the confidence cascade and the trained router (random routing as the baseline), pick the
threshold that meets a quality target or an escalation budget, and save the router in the store with its lineage.

The trained router learns, from the small model's embedding of the prompt, whether the small answer is as good as
the large one (so escalating would not help). Its curve uses out-of-fold predictions (5-fold cross-validation), so it is not scored on the
prompts it learned from; the saved classifier is then fitted on all of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from slmkit import progress
from slmkit.card import ModelCard, sha256_file
from slmkit.errors import SlmkitError
from slmkit.route import curve as rc
from slmkit.route.devset import QAItem, quality, read_qa
from slmkit.route.drift import Reference
from slmkit.route.policies import Confidence, Router, Rules, fit_classifier, policy_to_dict
from slmkit.route.signals import SIGNALS, TOP_FOR_ENTROPY, signals_of
from slmkit.sources.endpoint import Endpoint
from slmkit.sources.forms import ROUTER_CONFIG, ROUTER_FILE
from slmkit.store import Store, validate_name

FOLDS = 5
L2_GRID = (1.0, 10.0, 100.0, 1000.0)
QA_MAX_TOKENS = 64



def _softmax_pick(lls: list[float], lengths: list[int]) -> tuple[int, float]:
    """acc_norm's pick (log-likelihood per character) and its probability among the choices."""
    normed = [ll / max(n, 1) for ll, n in zip(lls, lengths)]
    pick = max(range(len(lls)), key=normed.__getitem__)
    probs = torch.softmax(torch.tensor(lls, dtype=torch.float64), 0)
    return pick, float(probs[pick])


def measure_choice(model: Any, task: str, limit: int | None, data_dir: Path | None) -> tuple[list[str], list[float], list[float]]:
    """(prompts, right 1/0, confidence in the pick) per item of a multiple-choice task."""
    from slmkit.evaluate.choice import score_items
    from slmkit.evaluate.tasks import build_items, fewshot_rows, load_task, read_rows

    spec = load_task(task, data_dir=data_dir)
    if spec.shape != "choice":
        raise SlmkitError(f"task {spec.name} is not multiple choice", "Use a task such as arc_easy, or a QA dev file with --data.")
    items = build_items(spec, read_rows(spec, data_dir=data_dir), limit, fewshot_rows(spec, data_dir=data_dir))
    scores, owners = score_items(model, items, f"{spec.name} on {model.name}")
    lls: list[list[float]] = [[] for _ in items]
    for n, s in zip(owners, scores):
        lls[n].append(sum(s))
    right, conf = [], []
    for item, ll in zip(items, lls):
        pick, p = _softmax_pick(ll, item.choice_lengths)
        right.append(float(pick == item.gold))
        conf.append(p)
    return [item.contexts[0] for item in items], right, conf


def answer_all(target: Any, items: list[QAItem], max_tokens: int, what: str, *, steps: bool = False) -> tuple[list[str], list[Any]]:
    """Every item answered greedily, as the OpenAI routes answer (no repetition penalty), local model or endpoint."""
    texts, signals = [], []
    greedy = {"max_tokens": max_tokens, "temperature": 0.0, "repetition_penalty": 1.0}
    with progress.bar(what, len(items)) as advance:
        for it in items:
            if steps:
                gen = target.stream_chat([{"role": "user", "content": it.prompt}], **greedy, top_logprobs=TOP_FOR_ENTROPY)
                texts.append(gen.read())
                signals.append(signals_of(gen.steps))
            else:
                texts.append("".join(target.stream_chat([{"role": "user", "content": it.prompt}], **greedy)))
            advance(1)
    return texts, signals


def out_of_fold(x: torch.Tensor, y: torch.Tensor, folds: int = FOLDS, l2: float = 1.0) -> list[float]:
    """Each prompt's p(small answer is good enough) from a classifier that did not see it (deterministic folds)."""
    n = len(y)
    folds = max(2, min(folds, n))
    p = [0.0] * n
    for f in range(folds):
        test = [i for i in range(n) if i % folds == f]
        train = [i for i in range(n) if i % folds != f]
        ys = y[train]
        if len(set(ys.tolist())) < 2:  # a fold with one class: the base rate is all it can say
            for i in test:
                p[i] = float(ys.float().mean())
            continue
        clf = fit_classifier(x[train], ys, l2=l2)
        for i in test:
            p[i] = clf.prob(x[i].tolist())
    return p


def best_l2(x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    """The L2 strength (of L2_GRID) whose out-of-fold predictions have the least log loss, and those predictions:
    embeddings have hundreds of dimensions and dev sets a few hundred prompts, so the penalty matters."""
    best: tuple[float, float, list[float]] | None = None
    for l2 in L2_GRID:
        p = out_of_fold(x, y, l2=l2)
        loss = -sum(math.log(min(max(pi if yi else 1 - pi, 1e-6), 1.0)) for pi, yi in zip(p, y.tolist())) / len(p)
        if best is None or loss < best[0]:
            best = (loss, l2, p)
    assert best is not None
    return best[1], best[2]


def _plot(path: Path, curves: dict[str, list[rc.Point]], small_q: list[float], large_q: list[float], picked: rc.Point,
          served: str, quality_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    for label, pts in curves.items():
        ax.plot([p.escalated for p in pts], [p.quality for p in pts], label=label, lw=1.6)
    xs = [0.0, 1.0]
    ax.plot(xs, [rc.random_quality(small_q, large_q, x) for x in xs], "k--", lw=1, label="random routing")
    ax.scatter([picked.escalated], [picked.quality], color="red", zorder=5, label=f"served ({served}): {picked.escalated:.0%} escalated")
    ax.set_xlabel("share of requests sent to the large model")
    ax.set_ylabel(quality_name)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _measure_qa(small_m: Any, large_t: Any, data: Path, *, metric: str, signal: str, limit: int | None, prompt_column: str | None,
                answer_column: str | None, max_tokens: int, labels: tuple[str, str]) -> tuple[list[str], list[float], list[float], list[float],
                                                                                              dict[str, list[float]], dict[str, Any]]:
    """Both models answer every dev question (greedy): the prompts, each answer's quality for each model, the small
    answer's confidence by `signal` (and by every other signal, for comparison), and what the dev set was."""
    items = read_qa(data, prompt_column=prompt_column, answer_column=answer_column, limit=limit)
    s_text, s_sig = answer_all(small_m, items, max_tokens, f"{labels[0]} answers", steps=True)
    l_text, _ = answer_all(large_t, items, max_tokens, f"{labels[1]} answers")
    small_q = [quality(metric, a, it.reference) for a, it in zip(s_text, items)]
    large_q = [quality(metric, a, it.reference) for a, it in zip(l_text, items)]
    finite = lambda xs: [c if math.isfinite(c) else -1e9 for c in xs]  # noqa: E731
    others = {sig: finite([s.get(sig) for s in s_sig]) for sig in SIGNALS if sig != signal}
    dev = {"file": str(data), "sha256": sha256_file(Path(data)), "metric": metric, "limit": limit}
    return [it.prompt for it in items], small_q, large_q, finite([s.get(signal) for s in s_sig]), others, dev


def _train_router(small_m: Any, prompts: list[str], small_q: list[float], large_q: list[float],
                  needed: bool) -> tuple[Any, list[float] | None]:
    """A classifier on the small model's prompt embeddings of whether the small answer is as good as the large one:
    the classifier and each prompt's out-of-fold score. When every prompt has one label there is nothing to learn: an
    error if the router is the policy served (`needed`), else (None, None) and the report leaves it out."""
    with progress.step("Training the router on the small model's embeddings"):
        x = torch.tensor(small_m.backend.embed(prompts), dtype=torch.float64)  # (N, hidden)
        # the label: escalating would not help here (the small answer is as good as the large one), as RouteLLM's
        # win labels; a graded metric such as ROUGE-L needs no cut-off this way
        y = torch.tensor([1.0 if s >= lq else 0.0 for s, lq in zip(small_q, large_q)])
        if len(set(y.tolist())) < 2:
            if not needed:
                progress.note("no trained router to compare: the small model is " + ("as good as" if y[0] else "worse than")
                              + " the large one on every dev prompt")
                return None, None
            raise SlmkitError("the small model is " + ("as good as the large one" if y[0] else "worse than the large one")
                              + " on every dev prompt: a router has nothing to learn",
                              "Use a harder or larger dev set, or a different pair of models.")
        l2, router_scores = best_l2(x, y)
        return fit_classifier(x, y, l2=l2), router_scores


def _summaries(curves: dict[str, list[rc.Point]], small_q: list[float], large_q: list[float], large_quality: float) -> dict[str, Any]:
    """Each policy's curve in three numbers: area over random routing, whether it is above random everywhere, and
    the share kept on the small model at 95% of the large model's quality (None where it never gets there)."""
    summary = {}
    for label, pts in curves.items():
        at95 = rc.pick(pts, large_quality, target=0.95)
        summary[label] = {"area_over_random": rc.area_over_random(pts, small_q, large_q),
                          "beats_random_everywhere": rc.beats_random_everywhere(pts, small_q, large_q),
                          "kept_on_small_at_95pct": 1 - at95.escalated if at95.quality >= 0.95 * large_quality - 1e-12 else None}
    return summary


def _checked_policy(task: str | None, data: Path | None, target: float | None, max_escalation: float | None,
                    threshold: float | None, policy: str | None, signal: str, large: str) -> str:
    """The policy to calibrate (router for a multiple-choice set, else confidence, unless given), once the arguments
    are checked to make sense together."""
    if (task is None) == (data is None):
        raise SlmkitError("give a dev set: --task NAME (multiple choice) or --data FILE (questions with answers)", "One of the two.")
    if threshold is None and (target is None) == (max_escalation is None):
        raise SlmkitError("give exactly one of --target, --max-escalation or --threshold", "For example --target 0.95.")
    if signal not in SIGNALS:
        raise SlmkitError(f"unknown confidence signal {signal!r}", f"Signals: {', '.join(SIGNALS)}")
    policy = policy or ("router" if task else "confidence")
    if policy not in ("confidence", "router"):
        raise SlmkitError(f"unknown policy {policy!r}", "Policies: confidence (decide after the small answer), router (decide before).")
    if task and policy == "confidence":
        raise SlmkitError("a multiple-choice dev set gives the small model's choice probabilities, not the confidence of a generated answer",
                          "Serve --policy router from it, or calibrate the confidence cascade on questions with answers (--data FILE).")
    if task and large.startswith(("http://", "https://")):
        raise SlmkitError("a multiple-choice dev set scores choices, which an OpenAI endpoint does not do", "Use --data FILE (questions with answers), or a local large model.")
    return policy


def calibrate_stage(
    small: str, large: str, *, task: str | None = None, data: Path | None = None, limit: int | None = None,
    target: float | None = None, max_escalation: float | None = None, threshold: float | None = None,
    policy: str | None = None, signal: str = "mean_logprob", metric: str = "exact", prompt_column: str | None = None,
    answer_column: str | None = None, max_tokens: int = QA_MAX_TOKENS, large_model: str | None = None,
    large_key: str | None = None, rules: Rules | None = None, name: str | None = None, data_dir: Path | None = None,
    backend: str = "auto", store: Store | None = None, out: Path | None = None,
) -> tuple[ModelCard, dict[str, Any]]:
    """Calibrate a router from `small` (a store model) to `large` (a store model, or an OpenAI-compatible URL) on
    a multiple-choice `task` or a QA `data` file; install it as `name` and return its card and the report."""
    from slmkit.loading import load

    store = store or Store()
    policy = _checked_policy(task, data, target, max_escalation, threshold, policy, signal, large)
    name = validate_name(name or f"{small}-route")
    store.check_free(name)
    remote = large.startswith(("http://", "https://"))
    small_m = load(small, backend=backend, store=store)
    if remote:
        large_t: Any = Endpoint(large, large_model, large_key)
        large_t.check()
        large_label = large_t.label
    else:
        large_t = load(large, backend=backend, store=store)
        large_label = large
    if task:
        prompts, small_q, conf = measure_choice(small_m, task, limit, data_dir)
        _, large_q, _ = measure_choice(large_t, task, limit, data_dir)
        signal_used, quality_name, dev = "choice_probability", "accuracy (acc_norm)", {"task": task, "limit": limit}
        others = {}
    else:
        assert data is not None
        prompts, small_q, large_q, conf, others, dev = _measure_qa(small_m, large_t, data, metric=metric, signal=signal, limit=limit,
                                                                   prompt_column=prompt_column, answer_column=answer_column,
                                                                   max_tokens=max_tokens, labels=(small, large_label))
        signal_used, quality_name = signal, ("exact match" if metric == "exact" else "ROUGE-L F1")
    classifier, router_scores = _train_router(small_m, prompts, small_q, large_q, needed=policy == "router")
    curves = {f"confidence ({signal_used})": rc.curve(small_q, large_q, conf)}
    if router_scores is not None:
        curves["trained router"] = rc.curve(small_q, large_q, router_scores)
    served_key = f"confidence ({signal_used})" if policy == "confidence" else "trained router"
    for sig, scores in others.items():  # the other confidence signals, for comparison (--signal serves another)
        curves[f"confidence ({sig})"] = rc.curve(small_q, large_q, scores)
    served_scores = conf if policy == "confidence" else router_scores
    large_quality = sum(large_q) / len(large_q)
    if threshold is not None:
        picked = rc.at_threshold(curves[served_key], threshold, served_scores)
        picked = rc.Point(threshold, picked.escalated, picked.quality)
    else:
        picked = rc.pick(curves[served_key], large_quality, target=target, max_escalation=max_escalation)
    served_policy: Any = Confidence(picked.threshold, signal) if policy == "confidence" else Router(classifier, picked.threshold)
    summary = _summaries(curves, small_q, large_q, large_quality)
    report = {
        "small": small, "large": large_label, "dev": dev, "n": len(prompts), "quality": quality_name,
        "small_quality": sum(small_q) / len(small_q), "large_quality": large_quality, "policy": policy, "signal": signal_used,
        "picked": asdict(picked), "target": target, "max_escalation": max_escalation, "curves": summary,
        "points": {k: [asdict(p) for p in v] for k, v in curves.items()},
        "items": [{"small_q": s, "large_q": lq, "confidence": c, "router": r}
                  for s, lq, c, r in zip(small_q, large_q, conf, router_scores or [None] * len(conf))],
    }
    policies = ([policy_to_dict(rules)] if rules else []) + [policy_to_dict(served_policy)]
    router = {
        "format": 1, "small": small, "large": {"url": large, "model": large_t.model if remote else None} if remote else {"store": large},
        "policies": policies,
        "drift": {"prompt_chars": Reference.of([float(len(p)) for p in prompts]).as_dict(),
                  **({"confidence": Reference.of(conf).as_dict(), "confidence_signal": signal} if policy == "confidence" else {}),
                  "escalation_rate": picked.escalated},
        "calibration": {k: report[k] for k in ("dev", "n", "quality", "small_quality", "large_quality", "picked", "target", "max_escalation")},
    }

    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(ROUTER_CONFIG, indent=2) + "\n")
        (folder / ROUTER_FILE).write_text(json.dumps(router, indent=2) + "\n")
        (folder / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(folder / "calibration.png", curves, small_q, large_q, picked, policy, quality_name)

    card = store.derive(name, write, stage="route", parent=small, parameters=0, settings={
        "large": large_label, "policy": policy, "signal": signal_used, "threshold": picked.threshold, "dev": dev,
        "escalated": picked.escalated, "quality": picked.quality, "small_quality": report["small_quality"],
        "large_quality": large_quality, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()})
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return card, report
