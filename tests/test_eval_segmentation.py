"""Segmentation metrics (eval/segmentation.py) against an independent NumPy computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cvforge.eval import build_evaluator
from cvforge.eval.segmentation import SegmentationEvaluator


def _numpy_metrics(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """Per-class sets of pixels, no confusion matrix: IoU = |T & P| / |T | P| over non-ignored pixels."""
    valid = truth != 255
    t, p = truth[valid], predicted[valid]
    ious, accs, weights = [], [], []
    for c in range(num_classes):
        inter, union = np.sum((t == c) & (p == c)), np.sum((t == c) | (p == c))
        if union:
            ious.append(inter / union)
            weights.append(np.sum(t == c))
        if np.sum(t == c):
            accs.append(inter / np.sum(t == c))
    ious, weights = np.array(ious), np.array(weights)
    return {"mIoU": ious.mean(), "pixel_acc": np.mean(t == p), "mean_acc": np.mean(accs),
            "fwIoU": float((ious * weights).sum() / weights.sum())}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    num_classes = 5
    evaluator = SegmentationEvaluator(num_classes, [f"c{i}" for i in range(num_classes)])
    truths, preds = [], []
    for _ in range(3):  # several updates of different batch and image sizes
        b, h, w = rng.integers(1, 4), rng.integers(5, 20), rng.integers(5, 20)
        truth = rng.integers(0, num_classes - 1, (b, h, w))  # the last class never occurs in the truth ...
        truth[rng.random((b, h, w)) < 0.2] = 255
        pred = np.where(rng.random((b, h, w)) < 0.6, np.minimum(truth, num_classes - 2), rng.integers(0, num_classes, (b, h, w)))
        evaluator.update({"masks": torch.from_numpy(pred)}, {"mask": torch.from_numpy(truth)})
        truths.append(truth.ravel())
        preds.append(pred.ravel())
    got = evaluator.compute()
    expected = _numpy_metrics(np.concatenate(truths), np.concatenate(preds), num_classes)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["IoU/c4"] == 0.0  # ... but is predicted: a false positive class counts, with IoU 0
    assert math.isnan(got["acc/c4"])


def test_ignore_and_absent_classes():
    evaluator = build_evaluator("segment", ["background", "a", "b", "never"])
    assert isinstance(evaluator, SegmentationEvaluator)
    truth = torch.tensor([[[0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 3]]])  # the 255 pixel's prediction ("never") is not counted
    evaluator.update({"masks": pred}, [{"mask": truth[0]}])
    metrics = evaluator.compute()
    assert math.isnan(metrics["IoU/b"]) and math.isnan(metrics["IoU/never"])  # absent from both
    assert metrics["IoU/background"] == 0.5 and metrics["IoU/a"] == 0.5
    assert metrics["mIoU"] == 0.5 and metrics["pixel_acc"] == pytest.approx(2 / 3)
    assert int(evaluator.confusion.sum()) == 3
    evaluator.sync()  # no process group: a no-op
    evaluator.reset()
    assert math.isnan(evaluator.compute()["mIoU"])


def test_scores_alone_are_accepted_and_shapes_are_checked():
    evaluator = SegmentationEvaluator(2)
    scores = torch.zeros(1, 2, 2, 2)
    scores[:, 1] = 1.0
    evaluator.update({"scores": scores}, {"mask": torch.ones(1, 2, 2, dtype=torch.int64)})
    assert evaluator.compute()["mIoU"] == 1.0  # class 0 absent from both: left out of the mean
    with pytest.raises(ValueError):
        evaluator.update({"masks": torch.zeros(1, 3, 3, dtype=torch.int64)}, {"mask": torch.zeros(1, 2, 2)})
