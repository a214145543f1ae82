"""Training curves as a picture: the loss per step of one or several runs (beside a trained model, in reports)."""

from __future__ import annotations

import io
from typing import Any


def loss_curves_png(curves: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Training loss per step (solid) and validation loss where measured (dots) of each named run; PNG bytes."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), layout="constrained")
    for i, (name, hist) in enumerate(curves.items()):
        color = f"C{i % 10}"
        loss = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        if loss:
            ax.plot(*zip(*loss), color=color, lw=1.2, label=f"{name}: training loss")
        val = [(h["step"], h["val_loss"]) for h in hist if h.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o--", color=color, ms=4, lw=0.8, label=f"{name}: validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
