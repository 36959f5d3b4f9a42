"""Where R-CNN, SPPNet and Fast R-CNN look: class-agnostic region proposals from selective search
(Uijlings et al., 2013), computed once per image and cached on disk, or read from a file.

    source = SelectiveSearch(mode="fast")          # OpenCV contrib's implementation; "quality" finds more
    boxes = source(image)                          # uint8 [3, H, W] -> float [N, 4] xyxy pixels, cached
    report = precompute(dataset, source, workers=4)  # `cvforge data proposals DATA`: fill cache, recall

Selective search groups superpixels hierarchically by colour, texture, size and fill; every group's box is a
proposal. It is slow (about a second per VOC image in fast mode), so each image's proposals are stored under
``$CVFORGE_HOME/proposals`` (else ``~/.cache/cvforge/proposals``), keyed by a hash of the image's pixels and
the parameters: a changed image or setting never reuses stale boxes, and a copy of the data reuses them.

Precomputed proposals (another method, e.g. EdgeBoxes or MCG) come from a JSON file
``{"<image file name>": [[x1, y1, x2, y2], ...], ...}``: ``import_proposals(dataset, file)`` stores them in
the same cache under ``FileProposals(file).key``, and a model built with ``proposals="file:<path>"`` reads them.

For training, ``ProposalDataset`` computes proposals on the un-augmented image and applies the papers' only
augmentation, a horizontal flip, to image, boxes and proposals together (target key ``"proposals"``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou, remove_small_boxes

from cvforge.errors import CvforgeError, DataError

MODES = ("fast", "quality")


def proposals_cache_dir() -> Path:
    """``$CVFORGE_HOME/proposals``, else ``~/.cache/cvforge/proposals``."""
    home = os.environ.get("CVFORGE_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "cvforge") / "proposals"


def image_key(image: torch.Tensor, params: str) -> str:
    """Hex digest of the image's pixels, shape and the proposal parameters: the cache key."""
    pixels = np.ascontiguousarray(image.detach().to(torch.uint8).cpu().numpy())
    digest = hashlib.sha256(f"{tuple(pixels.shape)}|{params}|".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


class ProposalCache:
    """One .npy file of float32 [N, 4] xyxy boxes per key, under ``folder/<key[:2]>/<key>.npy``; written
    atomically (temporary file + ``os.replace``) so parallel workers never read half a file."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else proposals_cache_dir()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)).float().reshape(-1, 4)
        except (OSError, ValueError):  # a damaged entry is recomputed, never trusted
            return None

    def put(self, key: str, boxes: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{random.getrandbits(32):08x}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, boxes.detach().cpu().float().numpy())
        os.replace(tmp, path)


def selective_search(image: torch.Tensor, mode: str = "fast") -> torch.Tensor:
    """OpenCV contrib's selective search on uint8 [3, H, W] RGB -> float [N, 4] xyxy pixels (its order)."""
    import cv2
    cv2.setNumThreads(1)  # the parallelism is across images (``precompute``), not inside one
    bgr = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()[:, :, ::-1])
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    rects = search.process()
    boxes = torch.as_tensor(np.asarray(rects, dtype=np.float32).reshape(-1, 4))
    boxes[:, 2:] += boxes[:, :2]
    return boxes


class SelectiveSearch:
    """Proposal source: ``source(image uint8 [3, H, W]) -> float [N, 4] xyxy`` (at most ``max_proposals``,
    sides of at least ``min_size`` px, duplicates removed), cached on disk unless ``cache`` is False."""

    def __init__(self, mode: str = "fast", max_proposals: int = 2000, min_size: float = 2.0,
                 cache: bool | str = True):
        if mode not in MODES:
            raise CvforgeError(f"unknown selective search mode {mode!r}", None, f"use one of {', '.join(MODES)}")
        self.mode, self.max_proposals, self.min_size = mode, max_proposals, min_size
        self.cache = ProposalCache(cache if isinstance(cache, str) else None) if cache else None
        self.key = f"selective_search:{mode}:{max_proposals}:{min_size}"

    def compute(self, image: torch.Tensor) -> torch.Tensor:
        boxes = selective_search(image, self.mode)
        boxes = boxes[remove_small_boxes(boxes, self.min_size)]
        # duplicates out, OpenCV's order kept (small regions of the hierarchy first, then their merges)
        _, first = np.unique(boxes.numpy(), axis=0, return_index=True)
        return boxes[torch.from_numpy(np.sort(first))][: self.max_proposals]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self.compute(image)
        key = image_key(image, self.key)
        boxes = self.cache.get(key)
        if boxes is None:
            boxes = self.compute(image)
            self.cache.put(key, boxes)
        return boxes


class FileProposals:
    """Proposals imported from a file (``import_proposals``), read back from the cache by image content.
    An image that was not imported is an error that says how to import it."""

    def __init__(self, file: str, cache: bool | str = True):
        self.file = file
        self.key = f"file:{Path(file).name}"
        self.cache = ProposalCache(cache if isinstance(cache, str) else None)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        boxes = self.cache.get(image_key(image, self.key))
        if boxes is None:
            raise DataError("an image has no proposals in the imported file", self.file,
                            "run `cvforge data proposals DATA --from FILE` for every split you use")
        return boxes


def build_proposal_source(spec: str, max_proposals: int = 2000) -> SelectiveSearch | FileProposals:
    """"selective_search" / "selective_search_fast" / "selective_search_quality" / "file:<path>"."""
    if spec.startswith("file:"):
        return FileProposals(spec[len("file:"):])
    mode = {"selective_search": "fast", "selective_search_fast": "fast", "selective_search_quality": "quality"}
    if spec not in mode:
        raise CvforgeError(f"unknown proposal source {spec!r}", None,
                           "use selective_search_fast, selective_search_quality or file:<path to JSON>")
    return SelectiveSearch(mode[spec], max_proposals)


def read_proposal_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A JSON file {"<image file name>": [[x1, y1, x2, y2], ...]} -> {name: float [N, 4]}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {str(k): torch.tensor(v, dtype=torch.float32).reshape(-1, 4) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise DataError(f"cannot read proposals ({error})", path,
                        'write {"image.jpg": [[x1, y1, x2, y2], ...], ...} as JSON') from None


def import_proposals(dataset: Any, file: str) -> int:
    """Store the proposals of ``file`` for the images of ``dataset`` (a detection VisionDataset) in the cache
    under ``FileProposals(file).key``, matched by image file name. Returns how many images had proposals."""
    table = read_proposal_file(file)
    source, raw = FileProposals(file), _raw(dataset)
    found = 0
    for i, sample in enumerate(raw.samples):
        name = Path(sample.image).name
        boxes = table.get(name, table.get(Path(sample.image).stem))
        if boxes is not None:
            source.cache.put(image_key(raw[i][0], source.key), boxes)
            found += 1
    return found


def _raw(dataset: Any) -> Any:
    """The data set's records without augmentation."""
    raw = copy.copy(getattr(dataset, "dataset", dataset))
    raw.transforms = None
    return raw


def recall(proposals: list[torch.Tensor], gt_boxes: list[torch.Tensor],
           thresholds: tuple[float, ...] = (0.5, 0.7)) -> dict[float, float]:
    """Share of ground-truth boxes covered by some proposal with IoU >= t, for each t (1.0 with no boxes)."""
    best = [box_iou(g.float(), p.float()).max(1).values if len(p) else torch.zeros(len(g))
            for p, g in zip(proposals, gt_boxes) if len(g)]
    best = torch.cat(best) if best else torch.zeros(0)
    return {t: float((best >= t).float().mean()) if len(best) else 1.0 for t in thresholds}


def precompute(dataset: Any, source: Any, workers: int = 4, progress: bool = True) -> dict[str, float]:
    """Fill the cache for every image of ``dataset`` (threads: OpenCV releases the GIL) with a progress
    bar; returns {"images", "proposals_per_image", "recall@0.5", "recall@0.7"}."""
    from tqdm import tqdm
    raw = _raw(dataset)

    def one(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = raw[i]
        return source(image), target["boxes"]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(one, range(len(raw))), total=len(raw), disable=not progress,
                            desc="proposals", unit="img"))
    props, gts = [r[0] for r in results], [r[1] for r in results]
    hit = recall(props, gts)
    return {"images": len(raw), "proposals_per_image": sum(len(p) for p in props) / max(len(props), 1),
            "recall@0.5": hit[0.5], "recall@0.7": hit[0.7]}


class ProposalDataset(torch.utils.data.Dataset):
    """Training side of the proposal-based detectors: ``dataset[i]`` without its augmentation, plus
    ``target["proposals"]`` (float [N, 4] xyxy) from ``source``, flipped horizontally together with image and
    boxes with probability ``hflip`` (the papers' only augmentation). Other attributes: the wrapped set's."""

    def __init__(self, dataset: Any, source: Any, hflip: float = 0.5):
        self.dataset, self.source, self.hflip = dataset, source, hflip
        self.raw = _raw(dataset)

    def __len__(self) -> int:
        return len(self.raw)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "raw"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image, target = self.raw[index]
        proposals = self.source(image)
        if random.random() < self.hflip:
            width = image.shape[-1]
            image = tv_tensors.wrap(image.flip(-1), like=image)
            flip = lambda b: torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)
            target = {**target, "boxes": tv_tensors.wrap(flip(target["boxes"]), like=target["boxes"])}
            if "masks" in target:
                target["masks"] = tv_tensors.wrap(target["masks"].flip(-1), like=target["masks"])
            proposals = flip(proposals)
        return image, {**target, "proposals": proposals}


# ------------------------------------------------------------------------------- `cvforge data proposals`
def add_proposals_parser(verbs: Any) -> None:
    """The ``proposals`` verb of ``cvforge data``."""
    p = verbs.add_parser("proposals", help="precompute selective search proposals (cached) and report their recall")
    p.add_argument("data", help="shapes, a data YAML, a COCO JSON, a VOC root or a folder")
    p.add_argument("--split", default="train,val", help="comma-separated splits (default: train,val)")
    p.add_argument("--mode", choices=MODES, default="fast", help="selective search mode (default: fast)")
    p.add_argument("--max-proposals", type=int, default=2000, help="per image (default: 2000, the papers')")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel images")
    p.add_argument("--from", dest="from_file", metavar="JSON",
                   help='import precomputed proposals {"image file name": [[x1, y1, x2, y2], ...]} instead')


def run_proposals(args: Any) -> int:
    """Fill the proposal cache for each split and print the recall at IoU 0.5 and 0.7."""
    from cvforge.data import build_dataset
    for split in [s.strip() for s in args.split.split(",") if s.strip()]:
        dataset = build_dataset(args.data, split, "detect")
        if args.from_file:
            found = import_proposals(dataset, args.from_file)
            source: Any = FileProposals(args.from_file)
            print(f"{split}: imported proposals for {found} of {len(dataset)} images from {args.from_file}")
            if found < len(dataset):
                raise DataError(f"{len(dataset) - found} images of split {split} have no proposals", args.from_file,
                                "add an entry for every image file name")
        else:
            source = SelectiveSearch(args.mode, args.max_proposals)
        report = precompute(dataset, source, args.workers)
        print(f"{split}: {report['images']} images, {report['proposals_per_image']:.0f} proposals per image, "
              f"recall@0.5 {report['recall@0.5']:.3f}, recall@0.7 {report['recall@0.7']:.3f}")
    print(f"cache: {proposals_cache_dir()}")
    return 0
