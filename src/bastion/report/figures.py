"""The report's figures, drawn with matplotlib's Agg canvas (no display, no global backend change).

Each function returns a :class:`~bastion.report.model.Figure` (PNG bytes):

* :func:`eps_curve_figure`: robust accuracy (%) against eps, one line per series;
* :func:`gallery_figure`: clean images, adversarial images and the perturbation (an artifact of
  kind ``"gallery"``, :func:`bastion.report.artifacts.gallery`);
* :func:`diversity_figure`: heatmaps of ``(K, K)`` matrices (kind ``"diversity"``);
* :func:`landscape_figure`: seed 002's loss surface and loss-against-eps curves (kind ``"landscape"``).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from bastion.report.model import Figure


def _new_figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _image_array(t: torch.Tensor) -> Any:
    """(C, H, W) tensor -> array for imshow (H, W) gray or (H, W, 3)."""
    t = t.detach().float().cpu()
    if t.dim() == 3 and t.shape[0] == 1:
        return t[0].clamp(0, 1).numpy()
    if t.dim() == 3:
        return t[:3].permute(1, 2, 0).clamp(0, 1).numpy()
    return t.clamp(0, 1).numpy()


def _pert_array(t: torch.Tensor, scale: float) -> Any:
    t = t.detach().float().cpu()
    if t.dim() == 3 and t.shape[0] == 1:
        return t[0].numpy()
    return (0.5 + t[:3].permute(1, 2, 0) / (2 * scale)).clamp(0, 1).numpy()


def eps_curve_figure(name: str, title: str, series: list[tuple[str, list[float], list[float], str]]) -> Figure:
    """Robust accuracy against eps; ``series``: ``(label, eps values, accuracies in [0, 1], line style)``."""
    fig = _new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, ys, style in series:
        ax.plot(xs, [100 * v for v in ys], style, marker="o", label=label)
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    return Figure(name, title, _png(fig))


def gallery_figure(name: str, caption: str, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Figure:
    """Three rows per gallery item: clean image, adversarial image, perturbation (with predictions)."""
    x, xa, p = tensors["x"], tensors["x_adv"], tensors["perturbation"]
    m = x.shape[0]
    names = doc.get("class_names")

    def cname(i: int) -> str:
        return str(names[i]) if names and 0 <= i < len(names) else str(i)

    fig = _new_figure(max(1.6 * m, 4.0), 5.4)
    scale = float(p.abs().max()) or 1.0
    for j in range(m):
        ax = fig.add_subplot(3, m, j + 1)
        ax.imshow(_image_array(x[j]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"y={cname(doc['labels'][j])}\npred {cname(doc['clean_pred'][j])}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(3, m, m + j + 1)
        ax.imshow(_image_array(xa[j]), cmap="gray", vmin=0, vmax=1)
        wrong = doc["adv_pred"][j] != doc["labels"][j]
        ax.set_title(f"adv pred {cname(doc['adv_pred'][j])}", fontsize=8, color="crimson" if wrong else "black")
        ax.axis("off")
        ax = fig.add_subplot(3, m, 2 * m + j + 1)
        ax.imshow(_pert_array(p[j], scale), cmap="seismic", vmin=-scale, vmax=scale)
        ax.set_title(f"|d|inf={float(p[j].abs().max()):.3g}", fontsize=8)
        ax.axis("off")
    fig.suptitle(caption, fontsize=9)
    return Figure(name, caption, _png(fig))


def diversity_figure(name: str, caption: str, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Figure:
    """One heatmap per ``(K, K)`` matrix, rows and columns labelled by ``doc["labels"]``."""
    keys = sorted(tensors)
    fig = _new_figure(4.2 * max(len(keys), 1), 3.8)
    labels = doc.get("labels")
    for i, k in enumerate(keys):
        mat = tensors[k].float().cpu()
        ax = fig.add_subplot(1, len(keys), i + 1)
        im = ax.imshow(mat.numpy(), cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(k, fontsize=9)
        kk = mat.shape[0]
        if labels and len(labels) == kk:
            ax.set_xticks(range(kk), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(kk), labels, fontsize=7)
        if kk <= 10:
            for a in range(kk):
                for b in range(kk):
                    ax.text(b, a, f"{float(mat[a, b]):.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.suptitle(caption, fontsize=9)
    return Figure(name, caption, _png(fig))


def landscape_figure(name: str, caption: str, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Figure:
    """Seed 002 Fig. 5 (loss surface over two directions) beside Fig. 6 (loss against eps)."""
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)

    fig = _new_figure(10.0, 4.0)
    surf = tensors["surface"].float().numpy()
    e1, e2 = tensors["eps1"].numpy(), tensors["eps2"].numpy()
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    import numpy as np

    X, Y = np.meshgrid(e1, e2)
    ax.plot_surface(X, Y, surf, cmap="coolwarm", linewidth=0)
    ax.set_xlabel("eps1 (dir. 1)", fontsize=8)
    ax.set_ylabel("eps2 (dir. 2)", fontsize=8)
    ax.set_zlabel("loss", fontsize=8)
    ax.set_title("loss over two adversarial directions", fontsize=9)
    ax2 = fig.add_subplot(1, 2, 2)
    eps = tensors["eps"].numpy()
    L = tensors["loss_vs_eps"].float().numpy()
    for row in L[:32]:
        ax2.plot(eps, row, color="gray", alpha=0.25, linewidth=0.8)
    ax2.plot(eps, L.mean(0), color="crimson", linewidth=2, label=f"mean of {L.shape[0]} images")
    ax2.set_xlabel("eps (FGSM direction)")
    ax2.set_ylabel("loss")
    ax2.set_title("loss against eps", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(caption, fontsize=9)
    return Figure(name, caption, _png(fig))


__all__ = ["diversity_figure", "eps_curve_figure", "gallery_figure", "landscape_figure"]
