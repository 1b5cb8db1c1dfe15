"""Plots of a training run: ``loss.png`` (train and eval loss per candidate) and, for a sweep,
``sweep.png`` (each candidate's final loss, the best marked)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List


def plot_run(result: Dict[str, object], out: Path) -> List[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install 'softprompt-kernels[bench]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = result["candidates"]
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(candidates):
        color = colors[i % len(colors)]
        label = c["name"] if len(candidates) > 1 else "train"
        if c["train_loss"]:
            steps, losses = zip(*c["train_loss"])
            ax.plot(steps, losses, color=color, alpha=0.55, linewidth=1, label=f"{label} (train)")
        if c["eval_loss"]:
            steps, losses = zip(*c["eval_loss"])
            ax.plot(steps, losses, color=color, marker="o", linewidth=2, label=f"{label} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{result['settings']['method']} on {Path(result['settings']['model']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(candidates) > 3 else 1)
    fig.tight_layout()
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if len(candidates) > 1:
        key = "final_eval_loss" if candidates[0]["final_eval_loss"] is not None else "final_train_loss"
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(candidates) + 2), 4.5))
        names = [c["name"] for c in candidates]
        values = [c[key] for c in candidates]
        bars = ax.bar(range(len(names)), values,
                      color=["tab:green" if n == result["best"] else "tab:gray" for n in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{len(names)} candidates (best: {result['best']})")
        fig.tight_layout()
        paths.append(out / "sweep.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
