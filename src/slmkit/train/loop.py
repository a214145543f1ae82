"""The training loop every training stage shares: AdamW with linear warmup and cosine decay, gradient accumulation,
clipping, optional bf16 autocast, validation perplexity, and checkpoints written atomically so that `resume`
continues after a crash or `kill -9` with no step lost or repeated: the data order and the learning rate are
functions of the step, and the checkpoint holds the weights and the optimizer's state (safetensors, no pickle).

The loop runs through `accelerate` (one CPU process by default; the same code under `accelerate launch`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit import faults, progress
from slmkit.errors import SlmkitError
from slmkit.store import pid_alive
from slmkit.train.curves import loss_curves_png
from slmkit.train.data import Windows
from slmkit.train.losses import next_token_loss

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
TokenLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, ids, mask) -> mean CE
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, with its one default."""

    steps: int | None = None  # optimizer steps; None: `epochs` passes over the training windows
    epochs: float = 1.0
    batch_size: int = 4  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup: float = 0.05  # share of the steps with a linear warmup
    min_lr_ratio: float = 0.1  # the cosine decays to lr * this
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 50
    bf16: bool = False  # autocast matmuls to bfloat16 (fast on CPUs with AVX-512 BF16 or AMX)

    def total_steps(self, windows: int) -> int:
        per_epoch = windows // (self.batch_size * self.grad_accum)
        if per_epoch < 1:
            raise SlmkitError(f"{windows} training windows make no step of {self.batch_size} x {self.grad_accum}",
                              "Give more data, or a smaller --batch-size / --grad-accum / --seq-len.")
        return self.steps or max(1, int(per_epoch * self.epochs))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over the first `warmup` share of the steps, then a cosine from lr down to lr * min_lr_ratio."""
    warm = max(1, int(total * cfg.warmup)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress_ = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))


def step_rows(step: int, micro: int, n_windows: int, cfg: TrainConfig, *, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The window indices of one micro-batch: a seeded permutation per epoch, consumed in order; under several
    processes each takes its share of the step's windows."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    per_epoch = n_windows // per_step
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
    order = torch.randperm(n_windows, generator=g)
    start = pos * per_step + (micro * world + rank) * cfg.batch_size
    return order[start: start + cfg.batch_size]


# ---- checkpoints (no pickle: tensors in safetensors, the rest in JSON) -----------------------------------------
def _save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file, save_model

    tmp = run_dir / f".{CHECKPOINT}-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        faults.point("writing")
        osd = opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in osd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
        if tensors:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": osd["param_groups"]}, indent=1))
        final = run_dir / CHECKPOINT
        old = run_dir / f".{CHECKPOINT}-old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
            faults.point("renaming")  # between the two renames: resume finds the old one whole
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep(run_dir: Path) -> None:
    """Temporary checkpoint folders a killed run left (their process is gone)."""
    import re

    for p in run_dir.glob(f".{CHECKPOINT}-tmp-*"):
        m = re.match(rf"\.{CHECKPOINT}-tmp-(\d+)-", p.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The last whole checkpoint of a run, or None."""
    final = run_dir / CHECKPOINT
    if (final / "state.json").is_file():
        return final
    olds = sorted(run_dir.glob(f".{CHECKPOINT}-old-*"))  # killed between the two renames: the previous one is whole
    return olds[-1] if olds and (olds[-1] / "state.json").is_file() else None


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file, load_model

    state = json.loads((path / "state.json").read_text())
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as exc:
        raise SlmkitError(f"the checkpoint in {path} does not fit this model: {str(exc).splitlines()[0]}",
                          "Resume with the same student it was made from, or start a new run (another --name).") from exc
    if missing or unexpected:
        raise SlmkitError(f"the checkpoint in {path} does not fit this model (missing {missing[:2]}, unexpected {unexpected[:2]})",
                          "Resume with the same student it was made from, or start a new run (another --name).")
    tensors = load_file(str(path / "optimizer.safetensors")) if (path / "optimizer.safetensors").is_file() else {}
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        per.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per, "param_groups": state.pop("param_groups")})
    return state


def plain_token_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `ids` (B, T+1) at the positions `mask` marks."""
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # (B, T, V)
    return next_token_loss(logits, ids[:, 1:], mask[:, 1:])


def validation_loss(model: nn.Module, valid: Windows, batch: int, token_loss: TokenLoss = plain_token_loss) -> float | None:
    """Mean next-token loss over the validation windows' learned positions (None without validation data)."""
    if len(valid) == 0:
        return None
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(valid), batch):
            ids, mask = valid.ids[i: i + batch], valid.mask[i: i + batch]
            n = float(mask[:, 1:].sum())
            total += float(token_loss(model, ids, mask)) * n
            count += n
    return total / max(count, 1)


def fit(model: nn.Module, train: Windows, valid: Windows, cfg: TrainConfig, run_dir: Path, loss_fn: LossFn, *,
        resume: bool = False, after_checkpoint: Callable[[int], None] | None = None,
        token_loss: TokenLoss = plain_token_loss) -> dict[str, Any]:
    """Train `model` in place on `train`; checkpoints in `run_dir`. Returns the run's history and totals.
    Validation measures `token_loss` (plain next-token cross-entropy unless the stage's model needs another)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    total = cfg.total_steps(len(train) // world)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run_dir.mkdir(parents=True, exist_ok=True)
    _sweep(run_dir)
    found = find_checkpoint(run_dir)
    start, history, tokens = 0, [], 0
    if found is not None and not resume:
        raise SlmkitError(f"{run_dir} already holds a checkpoint of a run", "Continue it with --resume, or start afresh under another --name.")
    if resume:
        if found is None:
            raise SlmkitError(f"nothing to resume in {run_dir}", "Run without --resume to start.")
        state = _load_checkpoint(found, model, opt)
        if state["total_steps"] != total or state["config"] != json.loads(json.dumps(asdict(cfg))):
            raise SlmkitError("the checkpoint was made with other settings or data", "Resume with the same options, or start afresh under another --name.")
        start, history, tokens = state["step"], state["history"], state["tokens"]
    model, opt = accelerator.prepare(model, opt)
    val_before = validation_loss(accelerator.unwrap_model(model), valid, cfg.batch_size, token_loss) if start == 0 else (history[0].get("val_before") if history else None)
    t0 = time.perf_counter()
    run_tokens = 0
    with progress.bar("training", total=total - start) as advance:
        for step in range(start, total):
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            parts_sum: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                idx = step_rows(step, micro, len(train), cfg, rank=rank, world=world)
                ids, mask = train.ids[idx], train.mask[idx]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, parts = loss_fn(model, ids, mask, idx)
                accelerator.backward(loss / cfg.grad_accum)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
                step_tokens = int(mask[:, 1:].sum()) * world
                tokens += step_tokens
                run_tokens += step_tokens
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.clip)) if cfg.clip > 0 else 0.0
            opt.step()
            opt.zero_grad(set_to_none=True)
            faults.point("computing")
            record = {"step": step + 1, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, **parts_sum}
            last = step + 1 == total
            if (step + 1) % cfg.eval_every == 0 or last:
                val = validation_loss(accelerator.unwrap_model(model), valid, cfg.batch_size, token_loss)
                model.train()
                record["val_loss"] = val
                elapsed = time.perf_counter() - t0
                progress.note(f"step {step + 1}/{total}: loss {parts_sum.get('loss', 0):.4f}"
                              + (f", validation perplexity {math.exp(val):.3f}" if val is not None else "")
                              + f", {run_tokens / max(elapsed, 1e-9):.0f} tokens/s")
            if step == 0:
                record["val_before"] = val_before
            history.append(record)
            if ((step + 1) % cfg.checkpoint_every == 0 or last) and accelerator.is_main_process:
                _save_checkpoint(run_dir, accelerator.unwrap_model(model), opt,
                                 {"step": step + 1, "total_steps": total, "tokens": tokens, "history": history,
                                  "config": asdict(cfg)})
                if after_checkpoint is not None:
                    after_checkpoint(step + 1)
            accelerator.wait_for_everyone()
            advance(1)
    model = accelerator.unwrap_model(model)
    model.eval()
    return {"steps": total, "tokens": tokens, "history": history, "val_before": val_before,
            "val_after": next((h["val_loss"] for h in reversed(history) if h.get("val_loss") is not None), None),
            "seconds": time.perf_counter() - t0, "world": world}


def with_loss_curve(write: Callable[[Path], None], name: str, curve: list[dict[str, Any]]) -> Callable[[Path], None]:
    """A store writer that also leaves the run's loss curve beside the weights (training.png)."""

    def both(folder: Path) -> None:
        write(folder)
        png = loss_curves_png({name: curve})
        if png:
            (folder / "training.png").write_bytes(png)

    return both
