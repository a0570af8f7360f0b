"""`training_loss.png`: training (and validation) loss against steps."""

from __future__ import annotations

from pathlib import Path


def plot_loss(log_history: list[dict], output_dir: str | Path) -> Path | None:
    """Draw the loss curves from the Trainer's log history; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {Path(output_dir).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(output_dir) / "training_loss.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
