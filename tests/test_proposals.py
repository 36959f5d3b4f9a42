"""Selective search proposals: boxes on a drawn image, the on-disk cache keyed by pixels and parameters,
recall, imported proposal files, the flip-consistent training wrapper, and `cvforge data proposals`."""
import json

import pytest
import torch

from cvforge.cli import main
from cvforge.errors import DataError
from cvforge.models.detection import proposals as P

TINY = "shapes:train=6,val=3,size=64,seed=5"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CVFORGE_HOME", str(tmp_path / "home"))


def _image():
    image = torch.full((3, 64, 64), 30, dtype=torch.uint8)
    image[:, 10:30, 20:50] = torch.tensor([220, 40, 40], dtype=torch.uint8)[:, None, None]
    return image


def test_selective_search_finds_a_drawn_square():
    for mode in P.MODES:
        boxes = P.SelectiveSearch(mode, cache=False)(_image())
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert P.recall([boxes], [torch.tensor([[20.0, 10.0, 50.0, 30.0]])])[0.7] == 1.0


def test_cache_keyed_by_pixels_and_parameters(monkeypatch):
    calls = []
    real = P.selective_search
    monkeypatch.setattr(P, "selective_search", lambda image, mode: calls.append(mode) or real(image, mode))
    source = P.SelectiveSearch("fast", max_proposals=50)
    first = source(_image())
    assert torch.equal(source(_image()), first) and len(calls) == 1  # read back from disk
    assert torch.equal(P.SelectiveSearch("fast", max_proposals=50)(_image()), first) and len(calls) == 1
    other = _image()
    other[0, 0, 0] = 31  # one pixel changed: a new key
    P.SelectiveSearch("fast", max_proposals=50)(other)
    P.SelectiveSearch("fast", max_proposals=10)(_image())  # other parameters: a new key
    assert len(calls) == 3
    assert len(list(P.proposals_cache_dir().rglob("*.npy"))) == 3


def test_recall_thresholds():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    props = [torch.tensor([[0.0, 0.0, 10.0, 6.0], [20.0, 20.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    assert P.recall(props, gt) == {0.5: 1.0, 0.7: 0.5}  # IoU 0.6 and 1.0
    assert P.recall([torch.zeros(0, 4)], gt[:1]) == {0.5: 0.0, 0.7: 0.0}  # an image with no proposals


def test_proposal_dataset_flips_everything_together():
    from cvforge.data import build_dataset
    data = build_dataset(TINY, "train", "detect")
    boxes = torch.tensor([[1.0, 2.0, 11.0, 12.0]])
    plain = P.ProposalDataset(data, lambda image: boxes, hflip=0.0)
    flipped = P.ProposalDataset(data, lambda image: boxes, hflip=1.0)
    (a, ta), (b, tb) = plain[0], flipped[0]
    width = a.shape[-1]
    assert torch.equal(b, a.flip(-1))
    assert torch.allclose(tb["proposals"], torch.tensor([[width - 11.0, 2.0, width - 1.0, 12.0]]))
    assert torch.allclose(tb["boxes"][:, [2, 0]], width - ta["boxes"][:, [0, 2]])
    assert len(plain) == len(data) and plain.classes == data.classes


def test_cli_reports_recall_and_imports_a_file(tmp_path, capsys):
    assert main(["data", "proposals", TINY, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: 6 images" in out and "val: 3 images" in out and "recall@0.5" in out and "recall@0.7" in out
    from cvforge.data import build_dataset
    data = build_dataset(TINY, "val", "detect")
    table = {s.image.name: [[0.0, 0.0, 8.0, 8.0]] for s in data.samples}
    file = tmp_path / "props.json"
    file.write_text(json.dumps(table))
    assert main(["data", "proposals", TINY, "--split", "val", "--from", str(file)]) == 0
    assert "imported proposals for 3 of 3" in capsys.readouterr().out
    source = P.build_proposal_source(f"file:{file}")
    assert source(data[0][0]).tolist() == [[0.0, 0.0, 8.0, 8.0]]
    with pytest.raises(DataError):
        source(torch.zeros(3, 8, 8, dtype=torch.uint8))  # an image that was not imported
    file.write_text("{not json")
    assert main(["data", "proposals", TINY, "--split", "val", "--from", str(file)]) == 2
