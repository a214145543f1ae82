"""`distill`: a teacher's knowledge into a student, on the user's data, with the student installed in the store.

The loss mixes a distillation term against the teacher's cached top-k log-probabilities (forward KL, reverse KL or
generalized JSD, at temperature tau) with the plain next-token loss: alpha * KD + (1 - alpha) * CE. alpha 0 is plain
next-token training on the same tokens (the baseline distillation has to beat), and needs no teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit import progress
from slmkit.card import ModelCard
from slmkit.compress.parents import float_parent
from slmkit.config import settings
from slmkit.errors import SlmkitError
from slmkit.layers.walk import count_params
from slmkit.sources.hf_dir import float_writer, load_float, load_tokenizer
from slmkit.store import Store, validate_name
from slmkit.train import data as td
from slmkit.train import teacher as tc
from slmkit.train.loop import TrainConfig, fit, with_loss_curve
from slmkit.train.losses import LOSSES, hidden_alignment, kd_loss, next_token_loss
from slmkit.train.student import fresh_student, parse_spec
from slmkit.sources.endpoint import Endpoint
from slmkit.train.synthetic import write_from_endpoint, write_synthetic

SEQ_LEN = 256
TAU = 2.0
ALPHA = 0.5


def same_tokenizer(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def _teacher_written(endpoint: Endpoint | None, load_teacher: Callable[[], Any], tokenizer: Any, paths: list[Path], run_dir: Path, *,
                     read: dict[str, Any] | None, synthetic: int, max_tokens: int, seed: int, rate: float,
                     resume: bool) -> tuple[list[Path], dict[str, Any] | None]:
    """The files the student reads and what the teacher wrote for them: a black-box teacher's answers to the data's
    prompts instead of the data (kept in the run: a stopped run asks only for the rest), or a local teacher's
    `synthetic` samples beside the data (reused by a resumed run)."""
    if endpoint is not None:
        endpoint.check()
        examples = [e for p in paths for e in td.read_examples(p, **(read or {}))]
        answers = run_dir / "teacher-answers.jsonl"
        info = write_from_endpoint(endpoint, examples, synthetic or len(examples), answers, max_tokens=max_tokens, seed=seed, rate=rate)
        return [answers], info  # the student learns the teacher's answers (the prompts are the user's)
    if synthetic <= 0:
        return paths, None
    synth = run_dir / "synthetic.jsonl"
    if resume and synth.is_file():
        return [*paths, synth], {"file": str(synth), "reused": True}
    from slmkit.engine.torch_backend import TorchBackend

    examples = [e for p in paths for e in td.read_examples(p, **(read or {}))]
    info = write_synthetic(TorchBackend(load_teacher()[0], tokenizer), examples, synthetic, synth, max_tokens=max_tokens, seed=seed)
    return [*paths, synth], info


def _teacher_cache(t_card: ModelCard, info: dict[str, Any], train: Any, load_teacher: Callable[[], Any], seq_len: int,
                   top_k: int) -> tuple[Any, dict[str, Any]]:
    """The teacher's top-k log-probabilities over every training window, computed once per (teacher, data, window,
    k) and kept in SLMKIT_HOME/cache/teacher; and what the card says of it."""
    key = tc.cache_key(t_card, info["sha256"], seq_len, top_k)
    cache, computed = tc.load_or_compute(settings().home / "cache" / "teacher", key, train, lambda: load_teacher()[0], k=top_k)
    progress.note(f"teacher cache: {cache.path.name}, {cache.bytes_per_token:.0f} bytes per token" + (" (computed now)" if computed else " (reused)"))
    return cache, {"file": str(cache.path), "key": key, "computed": computed, "top_k": top_k, "bytes_per_token": cache.bytes_per_token}


def _checked_alpha(remote: bool, student: str, data: list[Path], *, loss: str, alpha: float, tau: float, top_k: int,
                   hidden_weight: float) -> float:
    """The weight of the distillation loss once the settings are checked: 0 for a teacher behind an endpoint (it
    gives answers, not log-probabilities)."""
    if remote:
        if student.startswith("new:") or hidden_weight > 0:
            raise SlmkitError("a teacher behind an endpoint gives answers only: no weights to start a fresh student from or "
                              "hidden states to align", "Start from a store model (--student NAME) without --hidden-weight.")
        if alpha > 0:
            progress.note("the teacher is an endpoint (answers, no log-probabilities): the student learns its answers "
                          "by next-token loss (alpha 0)")
        alpha = 0.0
    if loss not in LOSSES:
        raise SlmkitError(f"unknown loss {loss!r}", f"Losses: {', '.join(LOSSES)}")
    if not 0 <= alpha <= 1 or tau <= 0 or top_k < 1 or hidden_weight < 0:
        raise SlmkitError("--alpha must be in [0, 1], --temperature > 0, --top-k >= 1 and --hidden-weight >= 0", "Fix the values.")
    if not data:
        raise SlmkitError("no training data given", "Pass --data FILE (text, JSON lines or CSV), repeatable.")
    return alpha


def distill_stage(
    teacher: str, student: str, data: list[Path], *, loss: str = "fkl", tau: float = TAU, alpha: float = ALPHA,
    top_k: int = tc.TOP_K, seq_len: int = SEQ_LEN, valid_fraction: float = 0.05, config: TrainConfig | None = None,
    name: str | None = None, resume: bool = False, store: Store | None = None, read: dict[str, Any] | None = None,
    synthetic: int = 0, synthetic_max_tokens: int = 128, hidden_weight: float = 0.0, teacher_model: str | None = None,
    teacher_key: str | None = None, teacher_rate: float = 0.0,
    prepare: Callable[[nn.Module], Callable[[], dict[str, Any]]] | None = None, stage: str | None = None,
) -> ModelCard:
    """Train store model `student` (or a fresh one, `new:layers=12,...`, initialised from the teacher) from `teacher`
    on `data` files, plus `synthetic` samples the teacher writes, and install the result as `name` (default
    STUDENT-distilled); `resume` continues the run of that name from its last checkpoint.

    A teacher given as a URL (an OpenAI-compatible endpoint, `teacher_model` there) is a black box: it gives answers,
    not log-probabilities, so the student learns its answers to prompts from `data` (`synthetic` of them, default one
    per example) by next-token loss; the answers are kept in the run and a stopped run goes on after them.

    `prepare(student)` changes the student before training (quantization-aware training puts its weights on a
    grid) and returns what runs after training, before the student is written: its dict goes into the card's
    settings. `stage` names the stage on the card (default distill, or train without a teacher)."""
    store = store or Store()
    cfg = config or TrainConfig()
    remote = teacher.startswith(("http://", "https://"))
    alpha = _checked_alpha(remote, student, data, loss=loss, alpha=alpha, tau=tau, top_k=top_k, hidden_weight=hidden_weight)
    fresh = student.startswith("new:")
    overrides = parse_spec(student) if fresh else {}
    name = validate_name(name or (f"{teacher}-student" if fresh else f"{student}-{'distilled' if alpha > 0 or remote else 'trained'}"))
    store.check_free(name)
    t_folder, t_card = (None, None) if remote else (store.require(teacher), store.card(teacher))
    load_teacher = lambda: load_float(t_folder, dtype=torch.float32, what=f"Loading the teacher {teacher}")  # noqa: E731
    init_info = None
    if fresh:
        t_net, tokenizer = load_teacher()
        net, init_info = fresh_student(t_net, overrides, seed=cfg.seed)
        del t_net
    else:
        s_folder, _ = float_parent(store, student)
        net, tokenizer = load_float(s_folder, dtype=torch.float32, what=f"Loading the student {student}")
    if alpha > 0 and not fresh:
        if not same_tokenizer(tokenizer, load_tokenizer(t_folder)):
            raise SlmkitError(f"{teacher} and {student} have different tokenizers: their token-level distributions cannot be compared",
                              "Pick a student made from the teacher (slmkit prune, lowrank), or one with the same tokenizer.")
    finish = prepare(net) if prepare is not None else None
    run_dir = settings().home / "runs" / name
    endpoint = Endpoint(teacher, teacher_model, teacher_key) if remote else None
    paths, synth_info = _teacher_written(endpoint, load_teacher, tokenizer, [Path(p) for p in data], run_dir, read=read, synthetic=synthetic,
                                         max_tokens=synthetic_max_tokens, seed=cfg.seed, rate=teacher_rate, resume=resume)
    with progress.step("Reading and packing the data"):
        train, valid, info = td.build(tokenizer, paths, seq_len=seq_len, valid_fraction=valid_fraction,
                                      seed=cfg.seed, **(read or {}))
    cache, cache_info = _teacher_cache(t_card, info, train, load_teacher, seq_len, top_k) if alpha > 0 else (None, None)
    t_live = None
    if hidden_weight > 0:  # Minitron's hidden-state alignment: the teacher stays in memory to give its states
        t_live = load_teacher()[0].eval().requires_grad_(False)
        if t_live.config.hidden_size != net.config.hidden_size:
            raise SlmkitError(f"hidden-state alignment needs the teacher's hidden size ({t_live.config.hidden_size}); "
                              f"the student has {net.config.hidden_size}",
                              "Leave out --hidden-weight, or use a student that keeps the hidden size (slmkit prune depth or width).")

    def loss_fn(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(input_ids=ids[:, :-1], use_cache=False, output_hidden_states=t_live is not None)
        logits = out.logits  # (B, T, V)
        m = mask[:, 1:]  # the learned targets
        ce = next_token_loss(logits, ids[:, 1:], m)
        parts = {"ce": float(ce.detach())}
        total = ce
        if cache is not None:
            kd = kd_loss(loss, logits, cache.values[idx], cache.ids[idx], m, tau=tau)
            total = alpha * kd + (1 - alpha) * ce
            parts["kd"] = float(kd.detach())
        if t_live is not None:
            with torch.no_grad():
                target = t_live(input_ids=ids[:, :-1], use_cache=False, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
            hid = hidden_alignment(out.hidden_states[-1], target, m)
            total = total + hidden_weight * hid
            parts["hidden"] = float(hid.detach())
        return total, {"loss": float(total.detach()), **parts}

    result = fit(net, train, valid, cfg, run_dir, loss_fn, resume=resume)
    finished = finish() if finish is not None else {}
    ppl = lambda v: math.exp(v) if v is not None else None  # noqa: E731
    train_settings = {
        "teacher": teacher if alpha > 0 or remote else None, "teacher_sha256": t_card.files if alpha > 0 else None,
        "teacher_model": endpoint.model if endpoint else None,
        "loss": loss if alpha > 0 else "next-token", "temperature": tau, "alpha": alpha, "data": info,
        "teacher_cache": cache_info, "hidden_weight": hidden_weight, "synthetic": synth_info, "student_init": init_info, "train": asdict(cfg), "steps": result["steps"], "tokens": result["tokens"],
        "seconds": result["seconds"], "processes": result["world"],
        "validation_perplexity": {"before": ppl(result["val_before"]), "after": ppl(result["val_after"])},
        "loss_curve": [{k: h[k] for k in ("step", "loss", "ce", "kd", "hidden", "val_loss") if k in h} for h in result["history"]],
        **finished,
    }

    return store.derive(name, with_loss_curve(float_writer(net, tokenizer, name), name, train_settings["loss_curve"]),
                        stage=stage or ("distill" if alpha > 0 else "train"),
                        parent=teacher if fresh else student, settings=train_settings,
                        parameters=count_params(net))
