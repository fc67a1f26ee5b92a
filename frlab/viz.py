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


def factor_grid(faces, label: int = 0, factors: tuple[str, ...] | None = None, scale: float = 1.1):
    """One row per nuisance factor: identity `label` swept over that factor's range, others frontal."""
    from .data.synth import SWEEPS

    factors = factors or tuple(SWEEPS)
    rows = [(f, SWEEPS[f][2]) for f in factors]
    ncol = max(len(v) for _, v in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(scale * ncol + 1.2, scale * len(rows)), squeeze=False)
    for r, (factor, values) in enumerate(rows):
        images = faces.sweep(label, factor, values)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(values):
                ax.imshow(images[c].permute(1, 2, 0).numpy())
                ax.set_title(f"{values[c]:g}", fontsize=7, fontweight="normal", pad=2)
        axes[r][0].set_ylabel(factor, fontsize=8, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.04, hspace=0.3)
    return fig


def face_explorer(faces, label: int = 0, zoom: int = 4):
    """ipywidgets sliders that re-render one face live as yaw, resolution, occlusion... move.

    Returns the widget (display it in a notebook cell). Each change renders one image with
    `faces.render`, a few milliseconds, and swaps the PNG bytes of an Image widget.
    """
    import io

    import ipywidgets as w

    from .data.synth import SWEEPS

    sliders = {"label": w.IntSlider(value=label, min=0, max=faces.num_classes - 1, description="identity")}
    for name in ("yaw", "pitch", "roll", "light_azimuth", "expression", "resolution", "blur", "noise", "exposure"):
        lo, hi, _ = SWEEPS[name]
        start = {"resolution": 1.0, "exposure": 1.0}.get(name, 0.0)
        sliders[name] = w.FloatSlider(value=start, min=lo, max=hi, step=(hi - lo) / 100, description=name, continuous_update=True)
    for name in ("glasses", "mask"):
        sliders[name] = w.Checkbox(value=False, description=name)
    image = w.Image(format="png", width=faces.size * zoom, height=faces.size * zoom)

    def update(_=None):
        values = {k: float(s.value) for k, s in sliders.items() if k != "label"}
        img = faces.render(int(sliders["label"].value), **values).permute(1, 2, 0).clamp(0, 1).numpy()
        buf = io.BytesIO()
        plt.imsave(buf, np.kron(img, np.ones((zoom, zoom, 1))), format="png")
        image.value = buf.getvalue()

    for s in sliders.values():
        s.observe(update, names="value")
    update()
    return w.HBox([w.VBox(list(sliders.values())), image])
