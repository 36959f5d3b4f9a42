"""Matcher thresholds, balanced sampling fractions, region sampling, box coder round trip, region-head loss
and postprocess (shared parts of the region-based detectors)."""
import math

import pytest
import torch

from cvforge.boxes import BoxCoder
from cvforge.models.detection.matching import BalancedSampler, Matcher, label_proposals, sample_regions
from cvforge.models.detection.roi_head import BoxPredictor, TwoFCHead, fast_rcnn_loss, postprocess


def test_matcher_thresholds():
    iou = torch.tensor([[0.9, 0.5, 0.49, 0.3, 0.29, 0.0],
                        [0.1, 0.6, 0.0, 0.0, 0.0, 0.0]])
    matched = Matcher(high=0.5, low=0.3)(iou)
    assert matched.tolist() == [0, 1, Matcher.BETWEEN, Matcher.BETWEEN, Matcher.BELOW_LOW, Matcher.BELOW_LOW]
    assert matched.dtype == torch.int64


def test_matcher_low_quality_and_no_gt():
    iou = torch.tensor([[0.2, 0.4, 0.1], [0.0, 0.05, 0.3]])
    plain = Matcher(0.7, 0.3)(iou)
    assert plain.tolist() == [-1, -2, -2]
    low_quality = Matcher(0.7, 0.3, allow_low_quality=True)(iou)
    assert low_quality.tolist() == [-1, 0, 1]  # each gt's best proposal becomes positive
    assert Matcher(0.5, 0.5)(torch.zeros(0, 4)).tolist() == [-1] * 4
    with pytest.raises(ValueError):
        Matcher(0.3, 0.5)


@pytest.mark.parametrize("num_pos,num_neg", [(100, 500), (5, 500), (100, 10), (0, 0)])
def test_balanced_sampler_fractions(num_pos, num_neg):
    labels = torch.cat([torch.full((num_pos,), 3), torch.zeros(num_neg, dtype=torch.int64),
                        torch.full((20,), -1)])
    torch.manual_seed(0)
    pos, neg = BalancedSampler(64, 0.25)(labels)
    assert pos.numel() == min(num_pos, 16)
    assert neg.numel() == min(num_neg, 64 - pos.numel())
    assert (labels[pos] > 0).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == pos.numel()  # no region drawn twice


def test_label_proposals_background_window():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 0.5], [50, 50, 60, 60.0]])
    labels, matched = label_proposals(props, gt, torch.tensor([2]), Matcher(0.5, 0.5), bg_low=0.1)
    assert labels.tolist() == [3, 3, -1, -1]  # IoU 1, 0.5 -> class 2 + 1; IoU 0.05 and 0 under bg_low
    assert matched.tolist() == [0, 0, -1, -1]
    labels, _ = label_proposals(props, gt, torch.tensor([2]), Matcher(0.6, 0.3))
    assert labels.tolist() == [3, -1, 0, 0]


def _proposals(n=300, size=64.0):
    xy = torch.rand(n, 2) * size * 0.7
    wh = torch.rand(n, 2) * size * 0.3 + 2
    return torch.cat([xy, xy + wh], 1)


def test_sample_regions_fractions_and_targets():
    torch.manual_seed(0)
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0], [35.0, 5.0, 60.0, 25.0]])
    near = gt.repeat(20, 1) + torch.randn(40, 4)  # many foreground proposals
    props = [torch.cat([near, _proposals()]), _proposals()]
    targets = [{"boxes": gt, "labels": torch.tensor([0, 4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # no objects
    coder = BoxCoder()
    regions, labels, deltas, matched = sample_regions(props, targets, Matcher(0.5, 0.5), BalancedSampler(64, 0.25),
                                                      coder, bg_low=0.1, return_matched=True)
    assert [len(r) for r in regions] == [64, 64]
    first, second = labels[:64], labels[64:]
    assert (first > 0).sum() == 16 and set(first[first > 0].tolist()) <= {1, 5}
    assert (second == 0).all()  # an image without objects: all background
    fg = (labels > 0).nonzero().squeeze(1)
    decoded = coder.decode(deltas[fg], torch.cat(regions)[fg])
    assert torch.allclose(decoded, gt[matched[0][:16]], atol=1e-3)
    assert (deltas[labels == 0] == 0).all() and (matched[1] == -1).all()


def test_sample_regions_no_proposals():
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([1])}]
    regions, labels, deltas = sample_regions([torch.zeros(0, 4)], targets, Matcher(0.5, 0.5),
                                             BalancedSampler(64, 0.25), BoxCoder())
    assert labels.tolist() == [2] and torch.equal(regions[0], gt)  # only the added ground truth
    regions, labels, deltas = sample_regions([torch.zeros(0, 4)], targets, Matcher(0.5, 0.5),
                                             BalancedSampler(64, 0.25), BoxCoder(), add_gt=False)
    assert labels.numel() == 0 and deltas.shape == (0, 4) and regions[0].shape == (0, 4)


def test_box_coder_round_trip():
    torch.manual_seed(0)
    coder = BoxCoder()
    props, gt = _proposals(50), _proposals(50)
    deltas = coder.encode(gt, props)
    assert deltas.shape == (50, 4)
    assert torch.allclose(coder.decode(deltas, props), gt, atol=1e-3)
    both = coder.decode(torch.cat([deltas, torch.zeros(50, 4)], 1), props)  # k = 2 boxes per proposal
    assert both.shape == (50, 8) and torch.allclose(both[:, 4:], props, atol=1e-4)
    same = coder.encode(props, props)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-5)
    huge = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert torch.isfinite(huge).all() and huge[0, 2] - huge[0, 0] <= 10 * 1000 / 16 + 1e-3
    assert math.isclose(BoxCoder((1, 1, 1, 1)).encode(torch.tensor([[0., 0, 20, 20]]),
                                                        torch.tensor([[0., 0, 10, 10]]))[0, 2].item(), math.log(2),
                        rel_tol=1e-5)


def test_head_loss_and_postprocess():
    torch.manual_seed(0)
    head, predictor = TwoFCHead(32 * 2 * 2, hidden=16, dropout=0.5), BoxPredictor(16, num_classes=3)
    logits, deltas = predictor(head(torch.randn(6, 32, 2, 2)))
    assert logits.shape == (6, 4) and deltas.shape == (6, 16)
    labels = torch.tensor([0, 1, 3, 0, 0, 2])
    losses = fast_rcnn_loss(logits, deltas, labels, torch.randn(6, 4))
    assert set(losses) == {"cls", "box"} and losses["box"] > 0
    sum(losses.values()).backward()
    assert predictor.bbox_pred.weight.grad.abs().sum() > 0
    empty = fast_rcnn_loss(logits[:0], deltas[:0], labels[:0], torch.zeros(0, 4))
    assert empty["cls"].item() == 0 and empty["cls"].requires_grad
    # postprocess: a confident class-2 region, and its duplicate suppressed by NMS
    scores = torch.full((3, 4), -10.0)
    scores[0, 3] = scores[1, 3] = 10.0
    scores[2, 0] = 10.0  # background
    regions = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [1.0, 1.0, 21.0, 21.0], [5.0, 5.0, 9.0, 9.0]])]
    out = postprocess(scores, torch.zeros(3, 16), regions, [(16, 16)], BoxCoder(), 0.05, 0.5, 100)
    assert len(out) == 1 and out[0]["labels"].tolist() == [2]
    assert out[0]["boxes"].tolist() == [[0.0, 0.0, 16.0, 16.0]]  # clipped to the image
    none = postprocess(scores[:0], None, [torch.zeros(0, 4)], [(16, 16)], BoxCoder())
    assert none[0]["boxes"].shape == (0, 4) and none[0]["labels"].dtype == torch.int64
