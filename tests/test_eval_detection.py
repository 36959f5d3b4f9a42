"""Detection evaluator: same 12 numbers as pycocotools' COCOeval used directly; VOC AP; edge cases."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from cvforge.eval import build_evaluator
from cvforge.eval.detection import COCO_KEYS, DetectionEvaluator, plot_pr_curves, voc_ap

CLASSES = ["a", "b", "c"]  # "c" never has ground truth


def _random_split(seed: int, images: int = 12):
    """Targets (some images empty) and noisy predictions near them plus false positives."""
    g = torch.Generator().manual_seed(seed)
    targets, predictions = [], []
    for i in range(images):
        n = 0 if i % 4 == 3 else int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 200
        wh = 4 + torch.rand(n, 2, generator=g) * 120  # small, medium and large objects
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 2, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "image_id": torch.tensor(i)})
        noisy = boxes + torch.randn(n, 4, generator=g) * 4
        extra = torch.rand(3, 4, generator=g) * 150
        extra[:, 2:] += extra[:, :2] + 5
        predictions.append({"boxes": torch.cat([noisy, extra]), "scores": torch.rand(n + 3, generator=g),
                            "labels": torch.cat([labels, torch.randint(0, 3, (3,), generator=g)])})
    return predictions, targets


def _direct_cocoeval(tmp_path, predictions, targets):
    """The reference: COCO JSON on disk, COCO(file), loadRes(list), COCOeval — the documented way."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    results = []
    for i, (p, t) in enumerate(zip(predictions, targets), start=1):
        gt["images"].append({"id": i, "width": 256, "height": 256})
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": label + 1,
                                      "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": i, "category_id": label + 1, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_same_twelve_numbers_as_cocoeval(tmp_path, seed):
    predictions, targets = _random_split(seed)
    evaluator = DetectionEvaluator(CLASSES)
    evaluator.update(predictions[:5], targets[:5])  # two batches
    evaluator.update(predictions[5:], targets[5:])
    metrics = evaluator.compute()
    reference = _direct_cocoeval(tmp_path, predictions, targets)
    np.testing.assert_allclose(evaluator.coco_stats, reference, atol=1e-12)
    assert 0 < metrics["mAP50-95"] < metrics["mAP50"] < 1
    for key, value in zip(COCO_KEYS, reference):
        assert metrics[key] == pytest.approx(value) if value >= 0 else math.isnan(metrics[key])
    assert math.isnan(metrics["AP/c"])  # a class without ground truth has no AP
    assert metrics["AP/a"] > 0 and metrics["AP/b"] > 0


def test_perfect_predictions_score_one():
    _, targets = _random_split(2)
    predictions = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
                   for t in targets]
    evaluator = build_evaluator("detect", CLASSES)
    evaluator.update(predictions, targets)
    metrics = evaluator.compute()
    for key in ("mAP50-95", "mAP50", "mAP75", "VOC07_AP50", "VOC_AP50", "AP/a"):
        assert metrics[key] == pytest.approx(1.0), key
    # every object on the confusion matrix diagonal, no background entries
    n = sum(len(t["labels"]) for t in targets)
    assert np.trace(evaluator.confusion) == n == evaluator.confusion.sum()


def test_no_predictions_gives_zero():
    _, targets = _random_split(3)
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
             for _ in targets]
    evaluator = DetectionEvaluator(CLASSES)
    evaluator.update(empty, targets)
    metrics = evaluator.compute()
    assert metrics["mAP50-95"] == 0 and metrics["mAP50"] == 0 and metrics["VOC07_AP50"] == 0
    assert evaluator.confusion[:3, 3].sum() == sum(len(t["labels"]) for t in targets)  # all missed


def test_images_without_objects_only():
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(3)]
    predictions = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([1])} for _ in range(3)]
    evaluator = DetectionEvaluator(CLASSES)
    evaluator.update(predictions, targets)
    metrics = evaluator.compute()
    assert math.isnan(metrics["mAP50-95"]) and math.isnan(metrics["VOC_AP50"])  # nothing to find
    assert evaluator.confusion[3, 1] == 3  # three false detections of class b
    evaluator.reset()
    assert math.isnan(evaluator.compute()["mAP50"])  # nothing at all


def test_voc_ap_known_curve():
    # 2 objects; detections: hit, miss, hit -> recall .5, .5, 1; precision 1, .5, .667
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc_ap(recall, precision, eleven_point=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_difficult_objects_are_ignored_in_voc_ap():
    target = {"boxes": torch.tensor([[0.0, 0, 20, 20], [50, 50, 80, 80]]), "labels": torch.tensor([0, 0]),
              "difficult": torch.tensor([False, True])}
    prediction = {"boxes": target["boxes"].clone(), "scores": torch.tensor([0.5, 0.9]), "labels": torch.tensor([0, 0])}
    evaluator = DetectionEvaluator(CLASSES)
    evaluator.update([prediction], [target])
    assert evaluator.compute()["VOC_AP50"] == pytest.approx(1.0)


def test_pr_plot_written(tmp_path):
    predictions, targets = _random_split(4)
    evaluator = DetectionEvaluator(CLASSES)
    evaluator.update(predictions, targets)
    evaluator.compute()
    path = plot_pr_curves(evaluator.curves, CLASSES, tmp_path / "pr.png")
    assert path.stat().st_size > 1000
