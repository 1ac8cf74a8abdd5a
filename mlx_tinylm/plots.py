"""loss.png: train and validation loss against training time and tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Draw train and validation loss from metrics.jsonl records into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("event") == "step"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "elapsed", "training time (s)"),
                           (axes[1], "tokens", "tokens trained")):
        ax.plot([r[key] for r in steps], [r["loss"] for r in steps], label="train", lw=1)
        if evals:
            ax.plot([r[key] for r in evals], [r["val_loss"] for r in evals], "o-",
                    label="validation", ms=3)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
