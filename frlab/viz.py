"""Figures with one look across the workbook. Every function returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch

from .eval import FPR_LEVELS, tangent_offsets, thresholds_at_fpr

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
        few = len(y) < 20  # a short run (a smoke run has a step or two): dots, or nothing would show
        ax.plot(steps, y, alpha=0.25, color="C0", marker="o" if few else None)
        ax.plot(steps[w - 1 :], smooth, color="C0", marker="o" if few else None)
        ax.set(xlabel="step", title=key)
        if len(y) < 3:
            ax.text(
                0.5,
                0.1,
                f"{len(y)} step{'s' * (len(y) != 1)}: too short a run for a curve",
                ha="center",
                transform=ax.transAxes,
                fontsize=8,
                color="0.4",
            )
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
        sliders[name] = w.FloatSlider(
            value=start, min=lo, max=hi, step=(hi - lo) / 100, description=name, continuous_update=True
        )
    for name in ("glasses", "mask"):
        sliders[name] = w.Checkbox(value=False, description=name)
    px = f"{faces.size * zoom}px"  # fixed: in a flex box an image stretches to its row's height
    image = w.Image(format="png", layout=w.Layout(width=px, height=px, min_width=px, min_height=px))

    def update(_=None):
        values = {k: float(s.value) for k, s in sliders.items() if k != "label"}
        img = faces.render(int(sliders["label"].value), **values).permute(1, 2, 0).clamp(0, 1).numpy()
        buf = io.BytesIO()
        plt.imsave(buf, np.kron(img, np.ones((zoom, zoom, 1))), format="png")
        image.value = buf.getvalue()

    for s in sliders.values():
        s.observe(update, names="value")
    update()
    return w.HBox([w.VBox(list(sliders.values())), image], layout=w.Layout(align_items="flex-start"))


def _class_colors(n: int):
    return sns.color_palette("husl", n)


def _ring(ax, phi: np.ndarray, cls: np.ndarray, radii: tuple[float, float], colors) -> None:
    """Fill an annulus in runs of equal class (class -1 is left white)."""
    cuts = np.flatnonzero(np.diff(cls)) + 1
    for run in np.split(np.arange(len(phi)), cuts):
        c = int(cls[run[0]])
        if c < 0:
            continue
        t = phi[run[0] : min(run[-1] + 2, len(phi))]
        xs = np.concatenate([radii[0] * np.cos(t), radii[1] * np.cos(t[::-1])])
        ys = np.concatenate([radii[0] * np.sin(t), radii[1] * np.sin(t[::-1])])
        ax.fill(xs, ys, color=colors[c], alpha=0.45, lw=0)


@torch.no_grad()
def circle_regions(head, n: int = 1441):
    """For angles phi around the circle (2-D heads): the nearest proxy, and the class whose margin
    a sample at that angle satisfies (-1 where none does: the margin gap)."""
    w = torch.nn.functional.normalize(head.weight.detach().float().cpu(), dim=1)
    phi = torch.linspace(-np.pi, np.pi, n)
    cos = torch.stack([torch.cos(phi), torch.sin(phi)], 1) @ w.T
    C = w.shape[0]
    ok = torch.stack([head.margin_logits(cos, torch.full((n,), c)).argmax(1) == c for c in range(C)], 1)
    owner = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    return phi, cos.argmax(1), owner


def embedding_circle(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    head,
    title: str = "",
    ax=None,
    jitter: float = 0.04,
    key: bool = False,
):
    """2-D embeddings on the unit circle with the class proxies (arrows) and two rings:
    inner, the inference regions (nearest proxy); outer, where a sample of each class is
    classified *with the head's margin* (white = no class has its margin: the margin gap).
    With `key`, a legend of rings, arrows and dots below the circle."""
    emb = torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=1)
    w = torch.nn.functional.normalize(head.weight.detach().float().cpu(), dim=1)
    if emb.shape[1] != 2:
        raise ValueError(f"embedding_circle needs 2-D embeddings, got {emb.shape[1]}-D")
    C = w.shape[0]
    colors = np.array(_class_colors(C))
    fig = ax.figure if ax is not None else plt.figure(figsize=(4.2, 4.2))
    ax = ax if ax is not None else fig.add_subplot()
    phi, nearest, owner = circle_regions(head)
    for radii, cls in (((0.80, 0.92), nearest), ((1.10, 1.22), owner)):
        _ring(ax, phi.numpy(), cls.numpy(), radii, colors)
    r = 1 + jitter * torch.randn(len(emb), generator=torch.Generator().manual_seed(0))
    ax.scatter(r * emb[:, 0], r * emb[:, 1], s=6, c=colors[labels.cpu().numpy()], alpha=0.8, lw=0)
    for c in range(C):
        ax.annotate(
            "", xy=1.35 * w[c].numpy(), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=colors[c], lw=1.5)
        )
    gap = float((owner < 0).float().mean())  # share of angles that satisfy no class's margin
    if key:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        gray = "0.45"
        handles = [
            Patch(color=gray, alpha=0.45, label="inner ring: nearest proxy (inference)"),
            Patch(facecolor="white", edgecolor=gray, label="outer ring: class with its margin (white: none)"),
            Line2D([], [], color=gray, marker=r"$\rightarrow$", ms=12, ls="", label="class proxy"),
            Line2D([], [], color=gray, marker="o", ms=3, ls="", label="sample (jittered off the circle)"),
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.02), fontsize=7, frameon=False)
    ax.set(aspect="equal", xlim=(-1.45, 1.45), ylim=(-1.45, 1.45), xticks=[], yticks=[])
    ax.set_title(title or type(head).__name__, fontsize=10)
    ax.text(0, -1.42, f"margin gap {gap:.0%} of the circle", ha="center", fontsize=8)
    return fig


def embedding_sphere(embeddings: torch.Tensor, labels: torch.Tensor, head, title: str = "", ax=None):
    """3-D embeddings on the unit sphere, with the class proxies as large markers."""
    emb = torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=1).numpy()
    w = torch.nn.functional.normalize(head.weight.detach().float().cpu(), dim=1).numpy()
    colors = np.array(_class_colors(w.shape[0]))
    if ax is None:
        fig = plt.figure(figsize=(4.2, 4.2))
        ax = fig.add_subplot(projection="3d")
    u, v = np.mgrid[0 : 2 * np.pi : 24j, 0 : np.pi : 12j]
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.4)
    ax.scatter(*emb.T, s=5, c=colors[labels.cpu().numpy()], alpha=0.8, depthshade=False)
    ax.scatter(*(1.12 * w).T, s=90, c=colors, marker="*", edgecolors="k", linewidths=0.5, depthshade=False)
    ax.set(xticks=[], yticks=[], zticks=[], box_aspect=(1, 1, 1))
    ax.set_title(title or type(head).__name__, fontsize=10)
    return ax.figure


def target_logit_curves(s: float = 64.0, m_cos: float = 0.35, m_arc: float = 0.5, ax=None, s_axis: float | None = None):
    """Target logit against the angle to the target proxy, for NormFace, CosFace and ArcFace
    (with its fallback beyond theta + m > pi): the margin is how far each curve sits below NormFace.
    `s_axis` fixes the y axis to the range of that scale (so that curves drawn at different s
    compare by eye); by default it follows s."""
    from .heads import arc_target

    theta = torch.linspace(0, np.pi, 361, dtype=torch.float64)
    c = torch.cos(theta)
    curves = {"NormFace": c, f"CosFace (m={m_cos:g})": c - m_cos, f"ArcFace (m={m_arc:g})": arc_target(c, m_arc)}
    fig = ax.figure if ax is not None else plt.figure(figsize=(5, 3.4))
    ax = ax if ax is not None else fig.add_subplot()
    for name, y in curves.items():
        ax.plot(np.degrees(theta.numpy()), s * y.numpy(), label=name)
    ax.axvline(np.degrees(np.pi - m_arc), color="0.6", ls=":", lw=1)
    ax.text(np.degrees(np.pi - m_arc), s * 0.9, " ArcFace fallback", fontsize=7, color="0.4")
    ax.set(xlabel="angle to the target proxy (degrees)", ylabel="target logit", title=f"target logits at s = {s:g}")
    if s_axis is not None:
        ax.set_ylim(-1.5 * s_axis, 1.05 * s_axis)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def margin_explorer(s: float = 64.0, m_cos: float = 0.35, m_arc: float = 0.5):
    """ipywidgets sliders for s and the margins that redraw the target-logit curves live, on a y
    axis fixed to the largest s: moving s stretches the curves instead of relabelling the axis."""
    import ipywidgets as w

    out = w.Output()
    sliders = {
        "s": w.FloatSlider(value=s, min=1, max=128, step=1, description="s"),
        "m_cos": w.FloatSlider(value=m_cos, min=0, max=1, step=0.01, description="CosFace m"),
        "m_arc": w.FloatSlider(value=m_arc, min=0, max=1.2, step=0.01, description="ArcFace m"),
    }

    def redraw(_=None):
        with out:
            out.clear_output(wait=True)
            fig = target_logit_curves(**{k: v.value for k, v in sliders.items()}, s_axis=sliders["s"].max)
            plt.show(fig)

    for sl in sliders.values():
        sl.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox(list(sliders.values())), out])


def anisotropy(spectra: dict[str, dict], top: int = 10, title: str = "intra-class spread in the tangent space"):
    """Left: each model's mean normalized eigen-spectrum of its classes' spread (first `top`
    eigenvalues, shaded between the 25th and 75th percentile of classes); right: the distribution
    of the per-class isotropy ratio. `spectra` maps a name to `eval.class_spectra(...)`."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for k, (name, sp) in enumerate(spectra.items()):
        ev = sp["spectrum"][:, :top]
        ev = (ev / ev[:, :1].clamp(min=1e-12)).numpy()
        x = np.arange(1, ev.shape[1] + 1)
        axes[0].plot(x, ev.mean(0), marker="o", ms=3, label=name, color=f"C{k}")
        axes[0].fill_between(x, np.percentile(ev, 25, 0), np.percentile(ev, 75, 0), alpha=0.15, color=f"C{k}")
        axes[1].hist(sp["isotropy"].numpy(), bins=20, range=(0, 1), alpha=0.45, label=name, color=f"C{k}")
    axes[0].set(xlabel="eigenvalue rank", ylabel="eigenvalue / largest", title="mean spectrum per class", yscale="log")
    axes[1].set(xlabel="isotropy (smallest / largest eigenvalue)", ylabel="classes", title="isotropy per class")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def easy_hard_distributions(
    scores: dict[str, torch.Tensor],
    same: torch.Tensor,
    easy: torch.Tensor,
    hard: torch.Tensor,
    bins: int = 60,
    title: str = "similarity distributions of easy and hard pairs",
):
    """The DDL paper's picture, one panel per model: genuine and impostor similarities of easy
    pairs (filled) and of hard pairs (outlined). `easy` and `hard` are masks over the pairs."""
    from .losses.ddl import easy_hard_gap

    same, easy, hard = (t.detach().cpu() for t in (same, easy, hard))
    fig, axes = plt.subplots(1, len(scores), figsize=(3.9 * len(scores), 3.2), squeeze=False, sharey=True)
    edges = np.linspace(-0.4, 1.0, bins + 1)
    for ax, (name, s) in zip(axes.flat, scores.items()):
        s = s.detach().cpu()
        for mask, kind, color in ((same, "genuine", GENUINE), (~same, "impostor", IMPOSTOR)):
            ax.hist(s[mask & easy].numpy(), bins=edges, density=True, alpha=0.45, color=color, label=f"easy {kind}")
            ax.hist(
                s[mask & hard].numpy(),
                bins=edges,
                density=True,
                histtype="step",
                lw=1.6,
                color=color,
                label=f"hard {kind}",
            )
        gap = easy_hard_gap(s, same, easy, hard)
        ax.set(
            xlabel="cosine similarity", title=f"{name}\nKL(easy||hard) genuine {gap.get('kl_pos', float('nan')):.2f}"
        )
    axes[0, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    return fig


def seed_points(table, metrics: tuple[str, ...], order: list[str] | None = None, title: str = ""):
    """One panel per metric: each model's value per seed (dots) and their mean (bar). `table` is a
    pandas DataFrame with columns "model", "seed" and the metrics."""
    order = order or list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.1), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        means = [table.loc[table["model"] == k, m].mean() for k in order]
        ax.bar(range(len(order)), means, color=[f"C{i}" for i in range(len(order))], alpha=0.35)
        for i, k in enumerate(order):
            v = table.loc[table["model"] == k, m].to_numpy()
            ax.plot(np.full(len(v), i) + np.linspace(-0.12, 0.12, len(v)), v, "o", color=f"C{i}", ms=4)
        ax.set(xticks=range(len(order)), title=m)
        values = table[m].to_numpy(dtype=float)
        if np.isfinite(values).any():  # a level a small run cannot resolve is NaN
            lo, hi = min(np.nanmin(values), 0.0), np.nanmax(values)
            ax.set_ylim(lo - 0.05 * (hi - lo) - 1e-9, hi + 0.1 * (hi - lo) + 1e-9)
        ax.set_xticklabels(order, rotation=20, fontsize=8)
    fig.suptitle(title)
    return fig


def tangent_clouds(embeddings: torch.Tensor, labels: torch.Tensor, title: str = "", ax=None, max_classes: int = 12):
    """Every class's shape, side by side at the origin: each class's unit features mapped to the
    tangent plane at its centre (eval.tangent_offsets, as in eval.class_spectra) and drawn in the class's own
    two principal axes, in degrees. Round clouds are isotropic; long thin ones anisotropic."""
    z = torch.nn.functional.normalize(embeddings.detach().double().cpu(), dim=1)
    labels = labels.cpu()
    fig = ax.figure if ax is not None else plt.figure(figsize=(3.8, 3.6))
    ax = ax if ax is not None else fig.add_subplot()
    classes = torch.unique(labels)[:max_classes]
    colors = _class_colors(len(classes))
    for k, c in enumerate(classes):
        zc = z[labels == c]
        if len(zc) < 3:
            continue
        v = tangent_offsets(zc)[0]
        v = v - v.mean(0)
        _, _, vh = torch.linalg.svd(v, full_matrices=False)
        xy = (v @ vh[:2].T).numpy() * 57.2958
        ax.scatter(xy[:, 0], xy[:, 1], s=6, color=colors[k], alpha=0.6)
    ax.axhline(0, color="0.7", lw=0.6)
    ax.axvline(0, color="0.7", lw=0.6)
    ax.set(xlabel="1st principal axis (deg)", ylabel="2nd principal axis (deg)", title=title, aspect="equal")
    return fig


def class_shape_summary(measures: dict[str, dict[str, np.ndarray]], title: str = "class shape, per class or sample"):
    """Distributions per model: measures maps a model name to arrays {"isotropy", "effective rank",
    "intra-class angle (deg)", "margin (deg)", ...}; one panel per measure, one box per model."""
    names = list(measures)
    keys = list(next(iter(measures.values())))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        data = [np.asarray(measures[n][key], dtype=float) for n in names]
        parts = ax.boxplot(data, showfliers=False, patch_artist=True, widths=0.6)
        for k, box in enumerate(parts["boxes"]):
            box.set(facecolor=f"C{k}", alpha=0.45)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_title(key)
    fig.suptitle(title)
    return fig


def teacher_student_scatter(
    teacher: torch.Tensor,
    student: torch.Tensor,
    same: torch.Tensor,
    levels=(1e-2, 1e-3, 1e-4),
    title: str = "",
    ax=None,
    max_points: int = 6000,
    seed: int = 0,
):
    """Teacher vs student similarity of the same pairs. Dashed lines: each model's threshold at each
    FPR level (vertical: teacher, horizontal: student). Critical pairs, drawn dark: pairs that the
    two models decide differently at some level (accepted by one, rejected by the other)."""
    t, s, same = teacher.detach().cpu().double(), student.detach().cpu().double(), same.detach().cpu().bool()
    thr = {}
    for name, x in (("teacher", t), ("student", s)):
        values, resolved = thresholds_at_fpr(x[~same], levels)
        thr[name] = values[resolved].tolist()
    n = len(thr["teacher"])
    critical = torch.zeros_like(same)
    for a, b in zip(thr["teacher"], thr["student"]):
        critical |= (t > a) != (s > b)  # accepted by one model, rejected by the other
    g = torch.Generator().manual_seed(seed)
    # keep every genuine pair up to half the budget, then impostors, favouring the critical ones
    pick = torch.randperm(len(t), generator=g)
    pick = torch.cat(
        [
            pick[same[pick]][: max_points // 2],
            pick[~same[pick] & critical[pick]][: max_points // 4],
            pick[~same[pick] & ~critical[pick]][: max_points // 4],
        ]
    )
    fig = ax.figure if ax is not None else plt.figure(figsize=(4.6, 4.4))
    ax = ax if ax is not None else fig.add_subplot()
    for mask, color, label in ((same, GENUINE, "genuine"), (~same, IMPOSTOR, "impostor")):
        m = mask[pick] & ~critical[pick]
        ax.scatter(t[pick][m], s[pick][m], s=3, alpha=0.25, color=color, label=label)
        m = mask[pick] & critical[pick]
        ax.scatter(
            t[pick][m],
            s[pick][m],
            s=6,
            alpha=0.9,
            color=color,
            edgecolors="k",
            linewidths=0.3,
            label=f"critical {label} ({int((mask & critical).sum()):,})",
        )
    for k in range(n):
        ax.axvline(thr["teacher"][k], color="0.3", ls="--", lw=0.7)
        ax.axhline(thr["student"][k], color="0.3", ls=":", lw=0.7)
        ax.text(thr["teacher"][k], 1.0, f"{levels[k]:.0e}", fontsize=6, rotation=90, va="top", ha="right")
    lo = float(min(t.min(), s.min()))
    ax.plot([lo, 1], [lo, 1], color="0.6", lw=0.6)
    ax.set(xlabel="teacher similarity", ylabel="student similarity", title=title)
    ax.legend(fontsize=6, markerscale=2, loc="upper left")
    return fig


def threshold_paths(history: list[dict[str, float]], levels=FPR_LEVELS, title: str = "EKD thresholds during training"):
    """Smoothed student (solid) and teacher (dashed) thresholds per FPR level, from a trainer history
    whose rows carry `threshold_student@<level>` and `threshold_teacher@<level>`."""
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    steps = np.array([h["step"] for h in history])
    for k, f in enumerate(levels):
        key = f"{f:.0e}"
        if f"threshold_student@{key}" not in history[0] or not any(h[f"threshold_student@{key}"] for h in history):
            continue  # a level no batch resolved
        ax.plot(steps, [h[f"threshold_student@{key}"] for h in history], color=f"C{k}", label=f"FPR {key}")
        ax.plot(steps, [h[f"threshold_teacher@{key}"] for h in history], color=f"C{k}", ls="--")
    ax.set(xlabel="step", ylabel="threshold (cosine)", title=title)
    ax.legend(fontsize=7, title="student solid, teacher dashed", title_fontsize=7)
    return fig


def transport_plan(image_a, image_b, plan, grid: tuple[int, int], ax=None, title: str = "", keep: float = 0.2):
    """Two faces side by side, and a line from each cell of the first to each cell of the second
    it sends mass to under `plan` (n, m) (row-major cells of a `grid` = (h, w) feature map), as
    opaque as the mass relative to the largest entry; entries below `keep` of it are not drawn.
    A near-uniform plan draws a haze of faint lines; a sharp one a few clear matches."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 2.8))
    to_hwc = lambda im: np.asarray(im.permute(1, 2, 0).float() / (255.0 if im.dtype == torch.uint8 else 1.0))  # noqa: E731
    a, b = to_hwc(image_a), to_hwc(image_b)
    H, W = a.shape[:2]
    gap = W // 8
    canvas = np.ones((H, 2 * W + gap, 3))
    canvas[:, :W], canvas[:, W + gap :] = a, b
    ax.imshow(canvas)
    h, w = grid
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * H / h - 0.5, (np.arange(w) + 0.5) * W / w - 0.5, indexing="ij")
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    p = np.asarray(plan, dtype=float)
    top = p.max()
    for i, j in zip(*np.nonzero(p >= keep * top)):
        alpha = float(p[i, j] / top)
        ax.plot([xs[i], xs[j] + W + gap], [ys[i], ys[j]], "-", color="C1", lw=0.4 + 1.6 * alpha, alpha=alpha)
    ax.plot(xs, ys, ".", color="w", ms=2)
    ax.plot(xs + W + gap, ys, ".", color="w", ms=2)
    ax.set(title=title, xticks=[], yticks=[])
    ax.grid(False)
    return ax
