"""YOLOv1: output layout, the paper's loss terms, responsible predictor, decoding."""
import pytest
import torch

from cvforge.models.detection.yolov1 import YOLOv1
from cvforge.zoo import build_model


def test_loss_terms_and_gradients():
    torch.manual_seed(0)
    model = YOLOv1(3, grid=4, imgsz=64, width=8, hidden=32).train()
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert set(losses) == {"coord", "conf_obj", "conf_noobj", "cls"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_perfect_output_has_zero_loss_and_decodes_to_the_box():
    model = YOLOv1(2, grid=4, imgsz=64, width=8, hidden=32)
    box, label = torch.tensor([[8.0, 8, 24, 40]]), torch.tensor([1])
    has, coords, xyxy, onehot = model.encode(box, label)
    out = torch.zeros(1, 4, 4, 12)
    i, j = has.nonzero()[0].tolist()
    out[0, i, j, 0:4] = coords[i, j]  # predictor 0 exact, confidence 1 (= its IoU)
    out[0, i, j, 4] = 1.0
    out[0, i, j, 10:] = onehot[i, j]
    losses = model.loss(out, [box], [label])
    assert all(v.abs() < 1e-5 for v in losses.values()), losses
    model.eval()
    det = model.postprocess(out, [(64, 64)])[0]
    assert det["labels"][0] == 1 and torch.allclose(det["boxes"][0], box[0], atol=1e-3)


def test_dropout_is_an_option_with_the_papers_default():
    """The paper's 0.5 after the first fully connected layer; ``model_args={"dropout": ...}`` changes it."""
    def dropout_of(model):
        return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropout_of(build_model("yolov1", task="detect", num_classes=2, imgsz=112)) == [0.5]
    assert dropout_of(build_model("yolov1", task="detect", num_classes=2, imgsz=112, dropout=0.0)) == [0.0]


@pytest.mark.slow
def test_learns_a_few_images():
    """Grid assignment, loss and decoding agree: 16 shapes images are fitted to mAP50 > 0.6 without augmentation."""
    from cvforge.data import build_dataset
    from cvforge.eval import build_evaluator
    torch.manual_seed(0)
    data = build_dataset("shapes:train=16,val=4,size=128,seed=5", "train", "detect")
    images, targets = zip(*(data[i] for i in range(16)))
    model = build_model("yolov1", task="detect", num_classes=len(data.classes), imgsz=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    for _ in range(120):
        loss = sum(model.train()(list(images), list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    evaluator = build_evaluator("detect", data.classes)
    with torch.no_grad():
        evaluator.update(model.eval()(list(images)), list(targets))
    assert evaluator.compute()["mAP50"] > 0.6
