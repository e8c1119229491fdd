"""Sample prediction plots: input as RGB, ground truth, prediction (and the error for regression).

Runs from saved predictions (no model, no GPU), reading the raw chips only for the RGB
composites, so changing plot settings re-runs only plotting.
"""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from geofm.tasks import SEGMENTATION, TASKS  # noqa: E402

IGNORED = (0.75, 0.75, 0.75)  # colour of unlabelled pixels


def _class_colours(n: int) -> ListedColormap:
    base = plt.get_cmap("tab20" if n > 10 else "tab10")
    return ListedColormap([IGNORED] + [base(i) for i in range(n)])


def plot_chip(
    task: str, image_path: Path, target: np.ndarray, pred: np.ndarray, title: str, out: Path, dpi: int
) -> None:
    spec = TASKS[task]
    panels = spec.rgb_panels(Path(image_path))
    n_extra = 2 if spec.kind == SEGMENTATION else 3
    fig, axes = plt.subplots(1, len(panels) + n_extra, figsize=(3.2 * (len(panels) + n_extra), 3.6), squeeze=False)
    axes = axes[0]
    for ax, (name, rgb) in zip(axes, panels):
        ax.imshow(rgb)
        ax.set_title(name)
    if spec.kind == SEGMENTATION:
        n = len(spec.class_names)
        cmap = _class_colours(n)
        norm = BoundaryNorm(np.arange(-1.5, n, 1), cmap.N)
        axes[len(panels)].imshow(target, cmap=cmap, norm=norm, interpolation="nearest")
        axes[len(panels)].set_title("Ground truth")
        axes[len(panels) + 1].imshow(np.where(target == -1, -1, pred), cmap=cmap, norm=norm, interpolation="nearest")
        axes[len(panels) + 1].set_title("Prediction")
        present = sorted(set(np.unique(target).tolist()) | set(np.unique(pred).tolist()) - {-1})
        handles = [Patch(color=cmap(c + 1), label=spec.class_names[c]) for c in present if 0 <= c < n]
        handles.append(Patch(color=IGNORED, label="no data (ignored)"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    else:
        labelled = target != -1
        vmax = float(max(np.nanmax(np.where(labelled, target, 0)), np.nanmax(pred), 1))
        gt = np.ma.masked_where(~labelled, target)
        im = axes[len(panels)].imshow(gt, cmap="YlGn", vmin=0, vmax=vmax, interpolation="nearest")
        axes[len(panels)].set_facecolor(IGNORED)
        axes[len(panels)].set_title("Ground truth")
        fig.colorbar(im, ax=axes[len(panels)], fraction=0.046, label=spec.units)
        im = axes[len(panels) + 1].imshow(pred, cmap="YlGn", vmin=0, vmax=vmax)
        axes[len(panels) + 1].set_title("Prediction")
        fig.colorbar(im, ax=axes[len(panels) + 1], fraction=0.046, label=spec.units)
        error = np.ma.masked_where(~labelled, pred - target)
        limit = float(max(np.abs(error).max() if error.count() else 1, 1))
        im = axes[len(panels) + 2].imshow(error, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axes[len(panels) + 2].set_facecolor(IGNORED)
        axes[len(panels) + 2].set_title("Error (prediction - truth)")
        fig.colorbar(im, ax=axes[len(panels) + 2], fraction=0.046, label=spec.units)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} | {Path(image_path).name}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if spec.kind == SEGMENTATION else 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def plot_predictions(
    task: str, predictions: Path, out_dir: Path, samples: int, seed: int, dpi: int, title: str
) -> list[Path]:
    """Plot `samples` test chips picked by `seed` (the same chips for every model and seed)."""
    data = np.load(predictions, allow_pickle=False)
    files = [str(f) for f in data["files"]]
    order = sorted(range(len(files)), key=lambda i: files[i])
    picked = sorted(random.Random(seed).sample(order, min(samples, len(order))), key=lambda i: files[i])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in picked:
        out = out_dir / f"{TASKS[task].chip_name(files[i])}.png"
        plot_chip(task, Path(files[i]), data["target"][i], data["pred"][i], title, out, dpi)
        written.append(out)
    return written


def plot_curves(task: str, curves: list[tuple[str, int, Path]], out: Path, dpi: int) -> None:
    """Training and validation loss and the checkpoint-selection metric per epoch, for every
    model (colour) and seed (line style) of a task, from TerraTorch's logged metrics."""
    import csv

    spec = TASKS[task]
    selection = spec.selection_metric
    panels = [
        ("train/loss", "training loss"),
        ("val/loss", "validation loss"),
        (selection, f"{selection} (selects the checkpoint)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    models = sorted({m for m, _, _ in curves})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    styles = ["-", "--", ":", "-."]
    for model, seed, path in curves:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        for ax, (key, _) in zip(axes, panels):
            points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if points:
                xs, ys = zip(*points)
                ax.plot(
                    xs,
                    ys,
                    styles[seed % len(styles)],
                    color=colours[model],
                    marker="o",
                    ms=3,
                    label=f"{model} seed {seed}",
                )
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{spec.title}: learning curves", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def write_curves(layout, cells, dpi: int) -> list[Path]:
    """One learning-curve figure per task, every model and seed that left its curves."""
    written = []
    for task in dict.fromkeys(c.task for c in cells):
        curves = [(c.model, c.seed, Path(layout.cell_file("curves.csv", *c))) for c in cells if c.task == task]
        curves = [c for c in curves if c[2].is_file()]
        if curves:
            out = Path(layout.curves_plot(task))
            plot_curves(task, curves, out, dpi)
            written.append(out)
    return written
