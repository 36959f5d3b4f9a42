"""`cvforge predict` for instance models: every detection of ``coco_results.json`` carries its mask as COCO
RLE at the original image's size (COCO's results format for segm), which pycocotools reads back and scores."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvforge.predict import describe, mask_rles, save_records


def _masks(height: int = 30, width: int = 40) -> torch.Tensor:
    masks = torch.zeros(3, height, width, dtype=torch.uint8)
    masks[0, 2:12, 3:15] = 1
    masks[1, 5:25, 20:38] = 1
    masks[1, 8:10, 24:30] = 0  # a hole: RLE keeps it
    return masks  # the third detection has an empty mask


def _predict(tmp_path, masks: torch.Tensor) -> tuple[list[dict], dict]:
    """One instance prediction of ``masks`` on a black picture, saved as `cvforge predict` saves it."""
    picture = tmp_path / "scene.png"
    Image.new("RGB", (masks.shape[2], masks.shape[1])).save(picture)
    output = [{"boxes": torch.tensor([[3.0, 2, 15, 12], [20, 5, 38, 25], [0, 0, 4, 4]]),
               "scores": torch.tensor([0.9, 0.8, 0.1]), "labels": torch.tensor([0, 1, 1]), "masks": masks}]
    records = [{"image": str(picture), **r} for r in describe("instance", output, ["a", "b"])]
    save_records("instance", records, tmp_path / "out")
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    return results, json.loads((tmp_path / "out" / "predictions.json").read_text())[0]


def test_every_detection_carries_its_mask_as_rle_at_the_image_size(tmp_path):
    masks = _masks()
    results, record = _predict(tmp_path, masks)
    assert len(results) == 3  # every detection, below the drawing threshold too
    for row, mask in zip(results, masks):
        rle = row["segmentation"]
        assert rle["size"] == [30, 40] and isinstance(rle["counts"], str)
        assert np.array_equal(mask_utils.decode(rle), mask.numpy())
        assert mask_utils.area(rle) == int(mask.sum())
    assert [d["segmentation"] for d in record["detections"]] == [r["segmentation"] for r in results]


def test_cocoeval_reads_the_results_as_segmentations(tmp_path, capsys):
    masks = _masks()
    results, _ = _predict(tmp_path, masks)
    gt = {"images": [{"id": 0, "width": 40, "height": 30, "file_name": "scene.png"}],
          "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}], "annotations": []}
    for k, (mask, label) in enumerate(zip(masks[:2], (0, 1))):  # the two objects, exactly as predicted
        rle = mask_rles(mask[None].numpy())[0]
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        gt["annotations"].append({"id": k + 1, "image_id": 0, "category_id": label, "segmentation": rle,
                                  "area": float(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0})
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    evaluation = COCOeval(coco, coco.loadRes(results), iouType="segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] > 0.99  # segm AP: perfect masks, read from the RLEs


def test_detect_results_have_no_segmentation_and_no_detection_no_rows(tmp_path):
    picture = tmp_path / "scene.png"
    Image.new("RGB", (20, 10)).save(picture)
    output = [{"boxes": torch.tensor([[1.0, 1, 5, 5]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([0])}]
    save_records("detect", [{"image": str(picture), **r} for r in describe("detect", output, ["a"])], tmp_path / "d")
    assert "segmentation" not in json.loads((tmp_path / "d" / "coco_results.json").read_text())[0]
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 10, 20, dtype=torch.uint8)}]
    save_records("instance", [{"image": str(picture), **r} for r in describe("instance", empty, ["a"])], tmp_path / "i")
    assert json.loads((tmp_path / "i" / "coco_results.json").read_text()) == []
    assert mask_rles(np.zeros((0, 10, 20), dtype=np.uint8)) == []
