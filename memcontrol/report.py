"""Tables, plots and image grids. Matplotlib with the Agg backend (headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from memcontrol import atomic  # noqa: E402


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) float in [0, 1] -> (n, H, W, 3) uint8."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def pair_grid(gen: torch.Tensor, nearest: torch.Tensor, sims: np.ndarray, *, cols: int = 4, scale: int = 2) -> Image.Image:
    """Each generation (top) above its nearest training image (bottom), similarity written on it."""
    g, r = to_uint8(gen), to_uint8(nearest)
    n, h, w, _ = g.shape
    rows = int(np.ceil(n / cols))
    canvas = Image.new("RGB", (cols * w * scale, rows * 2 * h * scale + rows * 12), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x, y = (i % cols) * w * scale, (i // cols) * (2 * h * scale + 12)
        canvas.paste(Image.fromarray(g[i]).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        canvas.paste(Image.fromarray(r[i]).resize((w * scale, h * scale), Image.NEAREST), (x, y + h * scale))
        draw.text((x + 2, y + 2 * h * scale), f"sim {sims[i]:.3f}", fill="black")
    return canvas


def image_grid(images: torch.Tensor, *, cols: int = 8, scale: int = 1) -> Image.Image:
    a = to_uint8(images)
    n, h, w, _ = a.shape
    rows = int(np.ceil(n / cols))
    canvas = Image.new("RGB", (cols * w * scale, rows * h * scale), "white")
    for i in range(n):
        canvas.paste(Image.fromarray(a[i]).resize((w * scale, h * scale)), ((i % cols) * w * scale, (i // cols) * h * scale))
    return canvas


def save_image(img: Image.Image, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        img.save(tmp)
    return path


def pareto_plot(
    trials: pd.DataFrame,
    *,
    x: str,
    y: str,
    path: Path,
    selected: int | None = None,
    baselines: pd.DataFrame | None = None,
) -> Path:
    """Scatter of every completed trial (front highlighted, selected ringed), baselines overlaid."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    ax.scatter(trials[x], trials[y], c="#bbbbbb", label="trials")
    front = trials[trials["pareto"]].sort_values(x)
    ax.plot(front[x], front[y], "o-", c="#1f77b4", label="Pareto front")
    for _, r in trials.iterrows():
        ax.annotate(str(int(r["number"])), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if selected is not None:
        s = trials[trials["number"] == selected]
        ax.scatter(s[x], s[y], s=220, facecolors="none", edgecolors="red", linewidths=2, label="selected")
    if baselines is not None and not baselines.empty:
        ax.scatter(baselines[x], baselines[y], marker="s", c="#d62728", label="baselines")
        for _, r in baselines.iterrows():
            ax.annotate(str(r["arm"]), (r[x], r[y]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel(f"{x} (lower = less memorization)")
    ax.set_ylabel(f"{y} (lower = better quality)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append(format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
