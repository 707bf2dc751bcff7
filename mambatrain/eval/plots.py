"""The evaluation's two pictures: loss by position (a curve) and passkey accuracy (a heatmap)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger("mambatrain")


def write_plots(results: dict, out: Path) -> list[Path]:
    """loss_by_position.png and passkey.png in ``out``; without matplotlib, says so and writes none."""
    try:
        import matplotlib
    except ImportError:
        log.warning("eval: matplotlib is not installed, so only results.json was written "
                    "(pip install 'mambatrain[eval]' for the plots)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curve = results["loss_by_position"]
    points = [(i + 1, v) for i, v in enumerate(curve["per_position"]) if v is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot(*zip(*points), lw=0.6, alpha=0.35, label="per position")
    bins = [b for b in curve["bins"] if b["tokens"]]
    if bins:
        ax.plot([math.sqrt(b["first"] * b["last"]) for b in bins], [b["loss"] for b in bins], "o-",
                label="log2 bins")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position in the document")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"loss by position ({curve['documents']} documents of {curve['seq_len']} tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_by_position.png", dpi=120)
    plt.close(fig)
    written.append(out / "loss_by_position.png")

    if "passkey" in results:
        grid = results["passkey"]
        values = [[math.nan if a is None else a for a in row] for row in grid["accuracy"]]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(grid["lengths"]), 1.2 + 0.5 * len(grid["depths"])))
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
        ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
        for i, row in enumerate(grid["accuracy"]):
            for j, a in enumerate(row):
                ax.text(j, i, "-" if a is None else f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey depth")
        ax.set_title(f"passkey retrieval ({grid['samples']} per cell)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "passkey.png", dpi=120)
        plt.close(fig)
        written.append(out / "passkey.png")
    return written
