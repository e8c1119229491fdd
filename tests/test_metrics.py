"""Pinned metric definitions and statistics, checked against independent numpy on hand-built data."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from geofm import stats
from geofm.metrics import PinnedMetrics
from geofm.tasks import TASKS

BIOMASS_BINS = TASKS["biomass"].value_bins


def _iou(pred, target, c):
    keep = target != -1
    p, t = pred[keep] == c, target[keep] == c
    union = (p | t).sum()
    return (p & t).sum() / union if union else None


def test_crop_miou_is_macro_over_present_classes_and_excludes_no_data():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, (3, 16, 16))  # only classes 0..4 of 13 occur
    target[:, :, :3] = -1  # "No Data"
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 6, target.shape))  # class 5: predicted only
    pred[target == -1] = 12  # predictions on ignored pixels must not count anywhere
    m = PinnedMetrics("crop")
    m.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))  # accumulates over batches
    m.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    out = m.compute()
    expected = [_iou(pred, target, c) for c in range(13)]
    assert [out[f"IoU_{n}"] for n in m.spec.class_names] == pytest.approx(
        [None if e is None else pytest.approx(e, abs=1e-6) for e in expected]
    )
    assert out["IoU_Other"] is None, "class 12 only predicted on ignored pixels: no score"
    assert out["IoU_Developed / Barren"] == 0.0, "class 5 predicted but never labelled: IoU 0, counted"
    present = [e for e in expected if e is not None]
    assert out["mIoU"] == pytest.approx(float(np.mean(present)), abs=1e-6)
    keep = target != -1
    assert out["pixel_accuracy"] == pytest.approx(float((pred[keep] == target[keep]).mean()), abs=1e-6)
    acc0 = ((pred == 0) & (target == 0)).sum() / (target == 0).sum()
    assert out["Acc_Natural Vegetation"] == pytest.approx(acc0, abs=1e-6)
    assert out["labelled_pixels"] == int(keep.sum())


def test_landslide_scores_are_those_of_the_landslide_class():
    # 10 landslide pixels: 6 found (TP), 4 missed (FN); 2 false alarms (FP); 88 true negatives.
    target = np.zeros(100, int)
    target[:10] = 1
    pred = np.zeros(100, int)
    pred[:6] = 1
    pred[10:12] = 1
    m = PinnedMetrics("landslide")
    m.update(torch.from_numpy(pred.reshape(1, 10, 10)), torch.from_numpy(target.reshape(1, 10, 10)))
    out = m.compute()
    assert out["landslide_IoU"] == pytest.approx(6 / 12)
    assert out["landslide_F1"] == pytest.approx(2 * 6 / (2 * 6 + 2 + 4))
    assert out["landslide_precision"] == pytest.approx(6 / 8)
    assert out["landslide_recall"] == pytest.approx(6 / 10)
    assert out["pixel_accuracy"] == pytest.approx(94 / 100), "pixel accuracy is not the landslide F1"
    assert out["mIoU"] == pytest.approx((6 / 12 + 88 / 94) / 2, abs=1e-6)


def test_biomass_errors_in_label_units_ignore_missing_footprints_and_bin():
    target = np.array([[10.0, 60.0, -1.0, 120.0], [220.0, -1.0, 40.0, 310.0]])
    pred = np.array([[20.0, 50.0, 999.0, 100.0], [250.0, 7.0, 40.0, 300.0]])
    m = PinnedMetrics("biomass")
    m.update(torch.from_numpy(pred[None]).float(), torch.from_numpy(target[None]).float())
    out = m.compute()
    keep = target != -1
    err = pred[keep] - target[keep]
    assert out["RMSE"] == pytest.approx(math.sqrt((err**2).mean()), rel=1e-5)
    assert out["MAE"] == pytest.approx(np.abs(err).mean(), rel=1e-5)
    t = target[keep]
    r2 = 1 - (err**2).sum() / ((t - t.mean()) ** 2).sum()
    assert out["R2"] == pytest.approx(r2, rel=1e-5)
    for lo, hi in zip(BIOMASS_BINS[:-1], BIOMASS_BINS[1:]):
        sel = (t >= lo) & (t < hi)
        name = f"RMSE_bin_{lo:g}-{hi:g}" if hi < 1e8 else f"RMSE_bin_{lo:g}+"
        expected = math.sqrt((err[sel] ** 2).mean()) if sel.any() else None
        assert out[name] == (pytest.approx(expected, rel=1e-5) if expected is not None else None), name
    assert out["labelled_pixels"] == 6


def test_bootstrap_interval_reproducible_and_sensible():
    values = list(np.random.default_rng(3).uniform(0.3, 0.5, 8))
    a = stats.bootstrap_ci(values, 5000, seed=7, confidence=0.95)
    b = stats.bootstrap_ci(values, 5000, seed=7, confidence=0.95)
    c = stats.bootstrap_ci(values, 5000, seed=8, confidence=0.95)
    assert a == b
    assert a != c
    assert min(values) <= a[0] < statistics.mean(values) < a[1] <= max(values)
    assert stats.bootstrap_ci([0.4], 5000, 7, 0.95) is None, "one seed: no zero-width interval"


def test_aggregate_matches_independent_computation_and_says_one_seed():
    cells = [
        {"task": "crop", "model": "a", "seed": 0, "metrics": {"mIoU": 0.40, "mAcc": 0.5}},
        {"task": "crop", "model": "a", "seed": 1, "metrics": {"mIoU": 0.46, "mAcc": 0.6}},
        {"task": "crop", "model": "b", "seed": 0, "metrics": {"mIoU": 0.30}},
    ]
    rows = {
        (r["model"], r["metric"]): r for r in stats.aggregate(cells, {"resamples": 1000, "seed": 0, "confidence": 0.95})
    }
    r = rows[("a", "mIoU")]
    assert r["mean"] == pytest.approx(0.43, abs=1e-6) and r["std"] == pytest.approx(
        statistics.stdev([0.40, 0.46]), abs=1e-6
    )
    assert r["seeds"] == 2 and r["headline"] and r["ci_low"] is not None
    one = rows[("b", "mIoU")]
    assert one["seeds"] == 1 and one["ci_low"] is None and one["std"] is None and one["ci_note"] == stats.ONE_SEED


def test_reference_delta_and_tolerance_flag():
    cells = [{"task": "crop", "model": "a", "seed": s, "metrics": {"mIoU": v}} for s, v in enumerate([0.40, 0.42])]
    boot = {"resamples": 1000, "seed": 0, "confidence": 0.95}
    inside = stats.aggregate(cells, boot, {"a": {"crop": {"metric": "mIoU", "value": 0.42, "tolerance": 0.02}}})
    outside = stats.aggregate(cells, boot, {"a": {"crop": {"metric": "mIoU", "value": 0.50, "tolerance": 0.02}}})
    assert inside[0]["delta_to_reference"] == pytest.approx(-0.01) and inside[0]["within_tolerance"] is True
    assert outside[0]["delta_to_reference"] == pytest.approx(-0.09) and outside[0]["within_tolerance"] is False


def test_ranking_respects_direction_of_each_headline():
    rows = [
        {"task": "crop", "model": "a", "headline": True, "mean": 0.5},
        {"task": "crop", "model": "b", "headline": True, "mean": 0.4},
        {"task": "biomass", "model": "a", "headline": True, "mean": 30.0},  # RMSE: lower is better
        {"task": "biomass", "model": "b", "headline": True, "mean": 20.0},
        {"task": "landslide", "model": "a", "headline": True, "mean": 0.7},
        {"task": "landslide", "model": "b", "headline": True, "mean": 0.6},
    ]
    table = {r["model"]: r for r in stats.ranking(rows)}
    assert table["a"]["rank_crop"] == 1 and table["b"]["rank_biomass"] == 1
    assert table["a"]["mean_rank"] == pytest.approx(4 / 3, abs=1e-3) and table["a"]["overall_rank"] == 1


def test_compare_self_is_zero_and_not_significant_but_real_gap_is():
    a = [{"task": "crop", "model": "m", "seed": s, "metrics": {"mIoU": v}} for s, v in enumerate([0.40, 0.42, 0.41])]
    boot = {"resamples": 2000, "seed": 0, "confidence": 0.95}
    same = stats.compare(a, a, boot)
    assert same[0]["difference"] == 0 and not same[0]["significant"]
    b = [{"task": "crop", "model": "m", "seed": s, "metrics": {"mIoU": v}} for s, v in enumerate([0.30, 0.31, 0.29])]
    gap = stats.compare(a, b, boot)
    assert gap[0]["difference"] == pytest.approx(0.11) and gap[0]["significant"]
