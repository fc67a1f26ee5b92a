"""Figures with one look across the workbook. Every function returns a matplotlib Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch

GENUINE, IMPOSTOR = "#2a9d8f", "#e76f51"


def style() -> None:
    """The workbook's look: seaborn's whitegrid with a muted palette and compact fonts."""
    sns.set_theme(context="notebook", style="whitegrid", palette="muted", font_scale=0.9)
    plt.rcParams.update({"figure.dpi": 100, "axes.titleweight": "bold", "figure.autolayout": True})


style()


def faces(images: torch.Tensor, nrow: int = 8, titles: list[str] | None = None, scale: float = 1.2):
    """A grid of (N, 3, H, W) or (N, 1, H, W) images in [0, 1]."""
    images = images.detach().cpu().float()
    n = len(images)
    ncol, nr = min(nrow, n), -(-n // nrow)
    fig, axes = plt.subplots(nr, ncol, figsize=(scale * ncol, scale * nr * (1.15 if titles else 1)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            img = images[k].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[k], fontsize=7, fontweight="normal")
    fig.subplots_adjust(wspace=0.03, hspace=0.03)
    return fig


def overlap(genuine: np.ndarray, impostor: np.ndarray, bins: np.ndarray) -> float:
    """Shared area of the two normalized histograms (0 = separable, 1 = identical)."""
    g, _ = np.histogram(genuine, bins=bins, density=True)
    i, _ = np.histogram(impostor, bins=bins, density=True)
    return float(np.minimum(g, i).sum() * (bins[1] - bins[0]))


def similarity_hist(scores: torch.Tensor, same: torch.Tensor, title: str = "", ax=None, bins: int = 80):
    """Genuine and impostor similarity distributions, with their overlap in the legend."""
    scores, same = scores.detach().cpu().numpy(), same.detach().cpu().numpy().astype(bool)
    fig = ax.figure if ax is not None else plt.figure(figsize=(5, 3.2))
    ax = ax if ax is not None else fig.add_subplot()
    edges = np.linspace(min(-0.2, scores.min()), 1.0, bins + 1)
    ov = overlap(scores[same], scores[~same], edges)
    ax.hist(scores[~same], bins=edges, density=True, alpha=0.55, color=IMPOSTOR, label=f"impostor ({(~same).sum():,})")
    ax.hist(scores[same], bins=edges, density=True, alpha=0.55, color=GENUINE, label=f"genuine ({same.sum():,})")
    ax.set(xlabel="cosine similarity", ylabel="density", title=title or f"overlap {ov:.3f}")
    ax.legend(title=f"overlap {ov:.3f}", fontsize=8, title_fontsize=8)
    return fig


def roc_curves(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], title: str = "ROC", ax=None):
    """ROC curves {name: (fpr, tpr)} on a log FPR axis."""
    fig = ax.figure if ax is not None else plt.figure(figsize=(5, 3.6))
    ax = ax if ax is not None else fig.add_subplot()
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        keep = fpr > 0
        ax.plot(fpr[keep], tpr[keep], label=name)
    ax.set(xscale="log", xlabel="false positive rate", ylabel="true positive rate", title=title, ylim=(0, 1.01))
    ax.legend(fontsize=8)
    return fig


def training_curves(history: list[dict[str, float]], keys: tuple[str, ...] = ("loss",), title: str = "training"):
    """Per-step curves of the given history keys (one panel each), smoothed over ~2% of the steps."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3), squeeze=False)
    steps = np.array([h["step"] for h in history])
    for ax, key in zip(axes.flat, keys):
        y = np.array([h[key] for h in history], dtype=float)
        w = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(steps, y, alpha=0.25, color="C0")
        ax.plot(steps[w - 1:], smooth, color="C0")
        ax.set(xlabel="step", title=key)
    fig.suptitle(title)
    return fig
