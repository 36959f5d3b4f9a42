"""Instance evaluator: box AP unchanged, mask AP equal to pycocotools' COCOeval("segm") used directly."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

from cvforge.eval import build_evaluator
from cvforge.eval.detection import DetectionEvaluator
from cvforge.eval.instance import InstanceEvaluator, encode_masks

CLASSES = ["a", "b"]
SIZE = 48


def _box_mask(box, shrink=0):
    mask = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
    x1, y1, x2, y2 = [int(v) for v in box]
    mask[y1 + shrink:y2 - shrink, x1 + shrink:x2 - shrink] = 1
    return mask


def _split(seed: int, images: int = 6):
    """Rectangular objects with masks; predictions: shifted boxes with eroded masks, plus a false one."""
    g = torch.Generator().manual_seed(seed)
    predictions, targets = [], []
    for i in range(images):
        n = 0 if i == images - 1 else int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.randint(0, 24, (n, 2), generator=g).float()
        boxes = torch.cat([xy, xy + torch.randint(8, 24, (n, 2), generator=g)], 1).clamp(max=SIZE)
        labels = torch.randint(0, 2, (n,), generator=g)
        masks = torch.stack([_box_mask(b) for b in boxes]) if n else torch.zeros(0, SIZE, SIZE, dtype=torch.uint8)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
        shrink = [int(torch.randint(0, 4, (1,), generator=g)) for _ in range(n)]
        p_masks = [_box_mask(b, s) for b, s in zip(boxes, shrink)] + [_box_mask([0, 0, 10, 10])]
        predictions.append({"boxes": torch.cat([boxes + 1, torch.tensor([[0.0, 0, 10, 10]])]),
                            "scores": torch.rand(n + 1, generator=g),
                            "labels": torch.cat([labels, torch.tensor([1])]), "masks": torch.stack(p_masks)})
    return predictions, targets


def _direct_segm(predictions, targets):
    """Reference: COCO gt from a dict with RLE segmentations, loadRes of a result list, COCOeval("segm")."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    results = []
    for i, (p, t) in enumerate(zip(predictions, targets), start=1):
        gt["images"].append({"id": i, "height": SIZE, "width": SIZE})
        for mask, label in zip(t["masks"].numpy(), t["labels"].tolist()):
            rle = mask_utils.encode(np.asfortranarray(mask))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": label + 1,
                                      "segmentation": rle, "area": float(mask_utils.area(rle)),
                                      "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
        for mask, score, label in zip(p["masks"].numpy(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": i, "category_id": label + 1, "score": score,
                            "segmentation": mask_utils.encode(np.asfortranarray(mask))})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_mask_ap_matches_cocoeval_and_box_ap_is_unchanged():
    predictions, targets = _split(0)
    evaluator = build_evaluator("instance", CLASSES)
    assert isinstance(evaluator, InstanceEvaluator)
    evaluator.update(predictions[:3], targets[:3])
    evaluator.update(predictions[3:], targets[3:])
    metrics = evaluator.compute()
    np.testing.assert_allclose(evaluator.mask_stats, _direct_segm(predictions, targets), atol=1e-12)
    boxes_only = DetectionEvaluator(CLASSES)
    boxes_only.update(predictions, targets)
    for key, value in boxes_only.compute().items():
        assert metrics[key] == pytest.approx(value, nan_ok=True)
    assert 0 < metrics["mask_mAP50-95"] < 1 and metrics["mask_mAP50-95"] != pytest.approx(metrics["mAP50-95"])


def test_perfect_masks_score_one_and_probabilities_are_thresholded():
    _, targets = _split(1)
    predictions = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"],
                    "masks": t["masks"].float() * 0.9} for t in targets]  # probabilities above 0.5
    evaluator = InstanceEvaluator(CLASSES)
    evaluator.update(predictions, targets)
    metrics = evaluator.compute()
    assert metrics["mask_mAP50-95"] == pytest.approx(1.0) and metrics["mAP50-95"] == pytest.approx(1.0)


def test_without_masks_only_box_ap_is_reported():
    predictions, targets = _split(2)
    evaluator = InstanceEvaluator(CLASSES)
    evaluator.update([{k: v for k, v in p.items() if k != "masks"} for p in predictions], targets)
    metrics = evaluator.compute()
    assert "mAP50-95" in metrics and not any(k.startswith("mask_") for k in metrics)
    empty = InstanceEvaluator(CLASSES).compute()
    assert math.isnan(empty["mAP50-95"])


def test_encode_masks_handles_empty_and_bool():
    assert encode_masks(torch.zeros(0, 4, 4, dtype=torch.uint8)) == []
    rles = encode_masks(torch.ones(2, 4, 4, dtype=torch.bool))
    assert len(rles) == 2 and rles[0]["size"] == [4, 4]
