"""Pinned metric definitions, computed with torchmetrics from each cell's test predictions.

The definitions (each task's `definitions`, geofm/tasks/<task>.py) are written into every metrics.json and the README, so two
results can only be compared when they mean the same thing. TerraTorch's own logged test
metrics are kept beside them, unchanged.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import MulticlassConfusionMatrix

from geofm.tasks import SEGMENTATION, TASKS

IGNORE = -1
NAN = float("nan")


def _bin_name(lo: float, hi: float) -> str:
    return f"RMSE_bin_{lo:g}-{hi:g}" if hi < 1e8 else f"RMSE_bin_{lo:g}+"


class PinnedMetrics:
    """Accumulate over batches of (prediction, target) maps; `compute()` returns a flat dict.

    Segmentation scores come from torchmetrics' confusion matrix (ignored pixels dropped);
    a class with no pixels in labels or predictions has no score (None) and is left out of
    the means; the task adds its own (e.g. the IoU of its positive class). Regression scores
    are torchmetrics' RMSE, MAE and R2 over labelled pixels, and RMSE per true-value range.
    """

    def __init__(self, task: str) -> None:
        self.spec = TASKS[task]
        if self.spec.kind == SEGMENTATION:
            self.confusion = MulticlassConfusionMatrix(len(self.spec.class_names), ignore_index=IGNORE)
        else:
            self.metrics = MetricCollection(
                {"RMSE": MeanSquaredError(squared=False), "MAE": MeanAbsoluteError(), "R2": R2Score()}
            )
            self.edges = self.spec.value_bins
            self.bins = [MeanSquaredError(squared=False) for _ in self.edges[:-1]]
            self.bin_counts = [0] * len(self.bins)
            self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.detach().cpu(), target.detach().cpu()
        if self.spec.kind == SEGMENTATION:
            self.confusion.update(pred.long().flatten(), target.long().flatten())
            return
        keep = target != IGNORE
        p, t = pred[keep].float(), target[keep].float()
        if t.numel():
            self.metrics.update(p, t)
            self.count += t.numel()
        for i, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            sel = (t >= lo) & (t < hi)
            if sel.any():
                self.bins[i].update(p[sel], t[sel])
                self.bin_counts[i] += int(sel.sum())

    def compute(self) -> dict[str, float | None]:
        if self.spec.kind == SEGMENTATION:
            return self._segmentation(self.confusion.compute().double())
        out: dict[str, float | None] = {}
        values = self.metrics.compute() if self.count else {}
        for key in ("RMSE", "MAE", "R2"):
            out[key] = _num(values[key].item()) if self.count else None
        for metric, count, lo, hi in zip(self.bins, self.bin_counts, self.edges[:-1], self.edges[1:]):
            out[_bin_name(lo, hi)] = _num(metric.compute().item()) if count else None
        out["labelled_pixels"] = self.count
        return out

    def _segmentation(self, cm: torch.Tensor) -> dict[str, float | None]:
        tp = cm.diag()
        fp = cm.sum(0) - tp  # predicted as the class, labelled otherwise
        fn = cm.sum(1) - tp  # labelled as the class, predicted otherwise

        def ratio(num, den):
            return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, NAN))

        iou, acc = ratio(tp, tp + fp + fn), ratio(tp, tp + fn)
        f1, precision = ratio(2 * tp, 2 * tp + fp + fn), ratio(tp, tp + fp)
        out: dict[str, float | None] = {}
        for name, i, a in zip(self.spec.class_names, iou.tolist(), acc.tolist()):
            out[f"IoU_{name}"], out[f"Acc_{name}"] = _num(i), _num(a)
        out["mIoU"] = _num(torch.nanmean(iou).item())
        out["mAcc"] = _num(torch.nanmean(acc).item())
        out["pixel_accuracy"] = _num((tp.sum() / cm.sum()).item()) if cm.sum() > 0 else None
        out.update({k: _num(v) for k, v in self.spec.extra_metrics(iou, f1, precision, acc).items()})
        out["labelled_pixels"] = int(cm.sum().item())
        return out


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def trivial_baseline(task: str, train_targets: list[torch.Tensor], test_targets: list[torch.Tensor]) -> dict:
    """The score of a model that ignores the input: the majority training class, or the
    training mean for regression. A fine-tuned model should beat it."""
    spec = TASKS[task]
    train = torch.cat([t.flatten() for t in train_targets])
    train = train[train != IGNORE]
    metrics = PinnedMetrics(task)
    for target in test_targets:
        if spec.kind == SEGMENTATION:
            constant = torch.mode(train.long()).values
        else:
            constant = train.float().mean()
        metrics.update(torch.full_like(target, constant.item(), dtype=torch.float32), target)
    return metrics.compute()


def baseline(task: str, root, splits_dir=None) -> dict:
    """The trivial baseline's document: its pinned scores on the task's reported split (the
    labels `Task.labels` yields for 'test'), trained on its training split."""
    from pathlib import Path

    spec = TASKS[task]
    splits_dir = Path(splits_dir) if splits_dir else None
    train = [torch.from_numpy(a) for a in spec.labels(Path(root), "train", splits_dir)]
    test = [torch.from_numpy(a) for a in spec.labels(Path(root), "test", splits_dir)]
    return {
        "task": task,
        "baseline": "majority training class" if spec.kind == SEGMENTATION else "training mean",
        "computed_on": spec.test_split,
        "headline": spec.headline,
        "pinned": trivial_baseline(task, train, test),
        "definitions": spec.definitions,
    }
