"""`training_loss.png`: training (and validation) loss against steps; and one
`training_<metric>.png` per extra metric a stage names (ppo: the reward)."""

from __future__ import annotations

from pathlib import Path


def plot_loss(
    log_history: list[dict], output_dir: str | Path, metrics: tuple[str, ...] = ()
) -> Path | None:
    """Draw the loss curves from the Trainer's log history; None when nothing was logged.

    Args:
        log_history: the Trainer's logged entries.
        output_dir: where the pictures go.
        metrics: further logged values to draw, each in training_<name>.png (with its eval_
            twin when validation logs one).
    """
    path = _plot_curve(log_history, output_dir, "loss")
    for name in metrics:
        _plot_curve(log_history, output_dir, name)
    return path


def _plot_curve(log_history: list[dict], output_dir: str | Path, key: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
    evals = [(e["step"], e[f"eval_{key}"]) for e in log_history if f"eval_{key}" in e]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label=f"train {key}")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label=f"validation {key}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"training {key} of {Path(output_dir).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(output_dir) / f"training_{key.replace('/', '_')}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
