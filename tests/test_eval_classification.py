"""ClassificationEvaluator against an independent numpy computation; confusion matrix plot."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cvforge.eval.classification import ClassificationEvaluator
from cvforge.viz import plot_confusion_matrix, plot_metrics_csv


def _reference(scores: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    order = np.argsort(-scores, axis=1)
    top1 = float(np.mean(order[:, 0] == labels))
    topk = float(np.mean([label in row[:k] for row, label in zip(order, labels)]))
    return {"top1": top1, "topk": topk}


@pytest.mark.parametrize("num_classes", [3, 7])
def test_matches_numpy_over_uneven_batches(num_classes):
    rng = np.random.default_rng(num_classes)
    scores = rng.random((101, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, 101)
    evaluator = ClassificationEvaluator(num_classes, [f"c{i}" for i in range(num_classes)])
    for start, stop in ((0, 1), (1, 40), (40, 101)):
        evaluator.update({"scores": torch.from_numpy(scores[start:stop])},
                         {"label": torch.from_numpy(labels[start:stop])})
    metrics = evaluator.compute()
    expected = _reference(scores, labels, min(5, num_classes))
    assert metrics["top1"] == pytest.approx(expected["top1"])
    assert metrics["top5"] == pytest.approx(expected["topk"])
    if num_classes < 5:
        assert metrics["top5"] == 1.0  # top-min(5, C): every class is among the C best
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, scores.argmax(axis=1)), 1)
    assert np.array_equal(evaluator.confusion.numpy(), confusion) and evaluator.confusion.dtype == torch.int64
    for i in range(num_classes):
        mask = labels == i
        assert metrics[f"per_class/c{i}"] == pytest.approx(np.mean(scores[mask].argmax(axis=1) == i))


def test_reset_list_targets_and_empty_classes():
    evaluator = ClassificationEvaluator(3)
    evaluator.update({"scores": torch.tensor([[0.9, 0.1, 0.0]])}, {"label": torch.tensor([1])})
    evaluator.reset()
    assert evaluator.confusion.sum() == 0
    scores = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    evaluator.update({"scores": scores}, [{"label": torch.tensor(1)}, {"label": torch.tensor(1)}])
    metrics = evaluator.compute()
    assert metrics["top1"] == 0.5 and metrics["per_class/1"] == 0.5
    assert np.isnan(metrics["per_class/0"])  # no image of class 0: nothing to measure, not 0 %
    with pytest.raises(ValueError, match="labels"):
        evaluator.update({"scores": scores}, {"label": torch.tensor([0, 3])})


def test_sync_is_a_noop_without_distributed():
    evaluator = ClassificationEvaluator(2)
    evaluator.update({"scores": torch.tensor([[0.2, 0.8]])}, {"label": torch.tensor([1])})
    evaluator.sync()
    assert evaluator.compute()["top1"] == 1.0


def test_confusion_matrix_png(tmp_path):
    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    path = plot_confusion_matrix(confusion, ["circle", "square", "a long class name"], tmp_path / "plots" / "cm.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    raw = plot_confusion_matrix(np.eye(30, dtype=np.int64), [str(i) for i in range(30)], tmp_path / "big.png",
                                normalize=False)
    assert raw.stat().st_size > 0


def test_metrics_csv_plot(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train/loss_cls,metrics/top1,metrics/per_class/a,lr,images_per_s\n"
                        "1,1.5,0.4,0.5,0.01,100\n2,1.1,0.6,,0.005,110\n", encoding="utf-8")
    path = plot_metrics_csv(csv_path, tmp_path / "plots" / "results.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height  # three panels side by side
