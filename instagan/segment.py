"""Instance masks for images that come without them: a torchvision Mask R-CNN, loaded from a local weights file,
keeps the instances of one category. No Ray, nothing downloaded.

    seg = InstanceSegmenter.from_file("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", category="sheep")
    found = seg.predict([img_uint8_hw3, ...])          # one Instances per image
    found[0].masks, found[0].scores                     # bool (K, H, W) by decreasing score, float32 (K,)
    seg.save("segmenter.pt")                            # arch, classes and state_dict; torch.load(weights_only=True)

Weights files, read with `torch.load(weights_only=True)`:
- torchvision's own COCO files, downloaded once by the user (torchvision's URLs, e.g.
  https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth for `maskrcnn_resnet50_fpn` and
  .../maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth for `maskrcnn_resnet50_fpn_v2`): a bare state_dict; the
  architecture is told by its keys (or `arch=`), the 91 labels are COCO's (`COCO_CATEGORIES`, "N/A" included), so a
  category is a COCO name ("sheep") or id (20).
- a segmenter checkpoint of this project (`save`; trained by instagan.segment_train / jobs/train_segmenter.py):
  {"format": FORMAT, "arch", "layout", "classes", "size", "width", "state_dict"}; its classes are the data set's
  category names (e.g. ["__background__", "ellipse"]).
A file whose keys or shapes do not fit the architecture raises ValueError naming the file and a few of them.

Architectures (`ARCHS`):
- `maskrcnn_resnet50_fpn` (v1) and `maskrcnn_resnet50_fpn_v2`: torchvision's, at torchvision's working size (shorter
  side 800, longer at most 1333). v1 is built as torchvision builds it for its COCO weights (frozen batch norm with
  eps 0, the 3 last ResNet stages trainable): `layout="pretrained"`; trained from scratch it is torchvision's
  `weights=None` model (`layout="scratch"`).
- `small`: ResNet-18's first three stages, an FPN of `width` (64) channels, light box and mask heads and anchors
  scaled to the working size (`size`, 128: 64 px images are upsampled twice). It is for CPUs and tests. Measured
  on one core of a 2-core machine: a training step of 4 images of 64 px takes 0.4-0.8 s (about 23 s for 2 images
  with v1 at its 800 px), prediction about 30 ms per 64 px image (5.8 s with v1).

Images: uint8 (H, W, 3) arrays, or a float (B, 3, H, W) tensor in [-1, 1] (instagan.masks conventions). Mask R-CNN
itself takes [0, 1] and normalises with ImageNet's mean and std; any size, the model resizes and pastes masks back.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.detection import (MaskRCNN, MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn,
                                          maskrcnn_resnet50_fpn_v2)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

FORMAT = "instagan-segmenter"
CHECKPOINT_FILE = "segmenter.pt"  # the segmenter in a training checkpoint folder (jobs/train_segmenter.py)
VERSION = 1
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "small")
LAYOUTS = ("pretrained", "scratch")
COCO_CATEGORIES: tuple[str, ...] = tuple(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])  # label = index
SMALL_SIZE = 128  # the small variant's working size (shorter side after the model's resize)
R50_SIZE = 800  # torchvision's working size for the R50 archs (longer side at most 1333)
SMALL_WIDTH = 64  # the small variant's FPN and head channels
MASK_THRESHOLD = 0.5  # a pixel belongs to an instance when its mask probability is at least this (torchvision's)


# ---- architectures -------------------------------------------------------------------------------------------

def build_model(arch: str, num_classes: int = len(COCO_CATEGORIES), layout: str = "pretrained",
                size: int = 0, width: int = SMALL_WIDTH) -> MaskRCNN:
    """A Mask R-CNN with random weights; num_classes counts the background (label 0).

    layout (the R50 archs): "pretrained" = how torchvision builds v1 for its COCO weights (frozen batch norm, eps 0,
    ResNet stages 1 and stem frozen), the layout to load COCO weights into and fine-tune; "scratch" = torchvision's
    weights=None model (batch norm, everything trainable). v2 is the same in both (torchvision's v2 keeps batch norm).
    size: the working size (shorter side after the model's resize, the longer at most 5/3 of it); 0 = the arch's
    own (small 128, R50 800). width: the small arch's channels."""
    if arch not in ARCHS:
        raise ValueError(f"unknown segmenter arch {arch!r}; one of {', '.join(ARCHS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if arch == "small":
        return _small(num_classes, size or SMALL_SIZE, width)
    size = size or R50_SIZE
    if arch == "maskrcnn_resnet50_fpn_v2":
        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes,
                                        min_size=size, max_size=size * 5 // 3)
    if layout == "scratch":
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, min_size=size,
                                     max_size=size * 5 // 3)
    # torchvision's maskrcnn_resnet50_fpn(weights=COCO_V1): resnet50(norm_layer=FrozenBatchNorm2d) + FPN extractor
    # with 3 trainable stages, then overwrite_eps(model, 0.0); the same state_dict keys as weights=None.
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3,
                                   norm_layer=functools.partial(FrozenBatchNorm2d, eps=0.0))
    return MaskRCNN(backbone, num_classes=num_classes, min_size=size, max_size=size * 5 // 3)


def _small(num_classes: int, size: int, width: int) -> MaskRCNN:
    """ResNet-18 stem + stages 1-3 (strides 4, 8, 16; stage 4 would see a 4x4 map at 128 px), an FPN of `width`
    channels plus its max-pool level, anchors of size/8 .. size (objects of a 64 px image fill 10-60% of its side),
    box head 2 x 256 FC, mask head 4 convs of `width`. Batch norm (trained from scratch: it needs normalisation)."""
    if size < 32 or width < 8:
        raise ValueError(f"small segmenter needs size >= 32 and width >= 8, got {size} and {width}")
    body = resnet18(weights=None)
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2"}, [64, 128, 256], width,
                               extra_blocks=LastLevelMaxPool())
    base = size // 8
    anchors = AnchorGenerator(tuple((base * 2 ** i,) for i in range(4)), ((0.5, 1.0, 2.0),) * 4)
    levels = ["0", "1", "2"]
    return MaskRCNN(
        backbone, num_classes=None, min_size=size, max_size=size * 5 // 3, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2), mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        box_head=TwoMLPHead(width * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
        mask_head=MaskRCNNHeads(width, [width] * 4, 1), mask_predictor=MaskRCNNPredictor(width, width, num_classes),
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128, box_batch_size_per_image=128)


def replace_classes(model: MaskRCNN, num_classes: int) -> MaskRCNN:
    """New box and mask predictors for num_classes (background included), the rest kept: fine-tuning COCO weights
    on other categories, as torchvision's detection tutorial does."""
    box = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box, num_classes)
    mask = model.roi_heads.mask_predictor
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask.conv5_mask.in_channels, mask.conv5_mask.out_channels,
                                                       num_classes)
    return model


_RENAMED = [(re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
            (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),
            (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2")]


def upgrade_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of torchvision's older layers under today's names, as torchvision's own loaders rename them (FPN
    blocks, mask head convs, RPN conv became Conv2dNormActivation): the COCO v1 file predates that change."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _RENAMED:
            m = pattern.match(key)
            if m and repl is None:  # mask_fcn<i> -> <i - 1>.0
                new = f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
            elif m:
                new = pattern.sub(repl, key)
        out[new if new not in state_dict else key] = value
    return out


def guess_arch(state_dict: Mapping[str, Tensor]) -> str | None:
    """Which torchvision Mask R-CNN a bare state_dict (upgraded keys) is for, from its keys; None when neither."""
    needed = {"roi_heads.mask_predictor.mask_fcn_logits.weight", "backbone.body.layer4.0.conv1.weight"}
    if not needed <= set(state_dict):
        return None
    if "roi_heads.box_head.0.0.weight" in state_dict:  # v2: a conv box head (FastRCNNConvFCHead)
        return "maskrcnn_resnet50_fpn_v2"
    if "roi_heads.box_head.fc6.weight" in state_dict:  # v1: two FC layers (TwoMLPHead)
        return "maskrcnn_resnet50_fpn"
    return None


def num_classes_of(state_dict: Mapping[str, Tensor]) -> int:
    w = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if not isinstance(w, Tensor) or w.ndim != 2:
        raise ValueError("no roi_heads.box_predictor.cls_score.weight of shape (classes, features)")
    return int(w.shape[0])


def load_state(model: nn.Module, state_dict: Mapping[str, Tensor], path: str | Path, arch: str) -> None:
    """model.load_state_dict after checking every key and shape; ValueError naming the file and a few mismatches.
    Batch-norm step counters (num_batches_tracked) may be absent or extra: torchvision's v1 COCO file has none."""
    own = model.state_dict()
    counter = "num_batches_tracked"
    missing = sorted(k for k in own if k not in state_dict and not k.endswith(counter))
    unexpected = sorted(k for k in state_dict if k not in own and not k.endswith(counter))
    shapes = sorted(f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}" for k in own
                    if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {name} (e.g. {', '.join(v[:3])})"
                 for name, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if v]
        guess = guess_arch(state_dict)
        hint = f"; its keys look like {guess}" if guess and guess != arch else ""
        raise ValueError(f"{path} does not hold {arch} weights: {'; '.join(parts)}{hint}")
    full = {k: v for k, v in state_dict.items() if k in own}
    full.update({k: own[k] for k in own if k.endswith(counter) and k not in state_dict})
    model.load_state_dict(full)


# ---- the segmenter -------------------------------------------------------------------------------------------

@dataclass
class Instances:
    masks: np.ndarray  # bool (K, H, W) at the image's size, by decreasing score; K may be 0
    scores: np.ndarray  # float32 (K,)


class InstanceSegmenter:
    """A Mask R-CNN and what to keep of its detections: one category (label), a score threshold, a least area in
    pixels, at most max_instances per image (the highest scores)."""

    def __init__(self, model: MaskRCNN, arch: str, classes: Sequence[str], category: str | int | None = None,
                 score_threshold: float = 0.5, min_area: int = 1, max_instances: int = 20,
                 device: str | torch.device = "cpu", batch_size: int = 8, layout: str = "pretrained",
                 width: int = SMALL_WIDTH):
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score threshold must be in [0, 1], got {score_threshold}")
        if min_area < 0 or max_instances < 1 or batch_size < 1:
            raise ValueError(f"min_area >= 0, max_instances >= 1 and batch_size >= 1, got {min_area}, "
                             f"{max_instances}, {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.arch, self.layout, self.width = arch, layout, width
        self.classes = list(classes)
        self.label = self.label_of(category)
        self.score_threshold, self.min_area = score_threshold, min_area
        self.max_instances, self.batch_size = max_instances, batch_size

    @property
    def category(self) -> str:
        return self.classes[self.label]

    @property
    def size(self) -> int:
        """The working size: the shorter side of an image after the model's own resize."""
        return int(self.model.transform.min_size[0])

    def label_of(self, category: str | int | None) -> int:
        """A class name or id (an int, or digits) -> its label; None picks the only class of a one-class model."""
        named = [i for i, c in enumerate(self.classes) if i > 0 and c != "N/A"]
        if category is None:
            if len(named) == 1:
                return named[0]
            raise ValueError(f"this segmenter knows {len(named)} categories: pick one (--category), e.g. "
                             f"{', '.join(self.classes[i] for i in named[:8])}")
        if isinstance(category, str) and category.strip().isdigit():
            category = int(category)
        if isinstance(category, int):
            if category in named:
                return category
            raise ValueError(f"category id {category} is not one of this segmenter's (1..{len(self.classes) - 1}, "
                             f"N/A excluded)")
        lowered = {c.lower(): i for i, c in enumerate(self.classes) if i in named}
        if category.strip().lower() in lowered:
            return lowered[category.strip().lower()]
        raise ValueError(f"unknown category {category!r}; this segmenter knows "
                         f"{', '.join(self.classes[i] for i in named[:12])}{' ...' if len(named) > 12 else ''}")

    @classmethod
    def from_file(cls, path: str | Path, arch: str | None = None, size: int = 0, **kwargs) -> "InstanceSegmenter":
        """Load torchvision's COCO weights file (a bare state_dict; arch told by its keys unless given), a segmenter
        checkpoint of this project, or a checkpoint folder holding one (segmenter.pt). size: the working size (0 =
        the file's, or the arch's); kwargs as the constructor's (category, score_threshold, device, ...)."""
        if Path(path).is_dir():
            path = Path(path) / CHECKPOINT_FILE
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"segmenter weights {path} not found") from None
        except Exception as e:  # not a torch file, a pickled module (weights_only refuses it), a torn copy
            raise ValueError(f"{path} is not a readable weights file (torch.load weights_only=True): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict or segmenter checkpoint")
        if obj.get("format") == FORMAT:
            if arch is not None and arch != obj["arch"]:
                raise ValueError(f"{path} is a {obj['arch']} segmenter checkpoint, not {arch}")
            return cls.from_checkpoint(obj, path, size, **kwargs)
        obj = upgrade_keys(obj)
        arch = arch or guess_arch(obj)
        if arch is None:
            keys = ", ".join(list(obj)[:3])
            raise ValueError(f"{path} is not a torchvision Mask R-CNN state_dict (its keys begin {keys}); pass the "
                             f"arch if it is one ({', '.join(ARCHS[:2])})")
        try:
            n = num_classes_of(obj)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        model = build_model(arch, n, "pretrained", size)
        load_state(model, obj, path, arch)
        classes = COCO_CATEGORIES if n == len(COCO_CATEGORIES) else ["__background__"] + [str(i) for i in range(1, n)]
        return cls(model, arch, classes, layout="pretrained", **kwargs)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping, path: str | Path = "<checkpoint>", size: int = 0,
                        **kwargs) -> "InstanceSegmenter":
        """A segmenter checkpoint dict (see `save`) -> the segmenter; ValueError naming `path` when it does not fit."""
        try:
            arch, layout, classes = ckpt["arch"], ckpt["layout"], list(ckpt["classes"])
            size, width = size or int(ckpt["size"]), int(ckpt["width"])
            model = build_model(arch, len(classes), layout, size, width)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid segmenter checkpoint: {type(e).__name__}: {e}") from None
        load_state(model, ckpt["state_dict"], path, arch)
        return cls(model, arch, classes, layout=layout, width=width, **kwargs)

    def checkpoint(self) -> dict:
        """What `save` writes: plain types and tensors only (torch.load(weights_only=True) reads it)."""
        return {"format": FORMAT, "version": VERSION, "arch": self.arch, "layout": self.layout,
                "classes": list(self.classes), "size": self.size, "width": self.width,
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.checkpoint(), tmp)
        tmp.replace(path)  # never a torn file under the final name
        return path

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray] | Tensor, category: str | int | None = None) -> list[Instances]:
        """Instances of the category (default: the segmenter's) in each image, in batches of batch_size.

        images: uint8 (H, W, 3) arrays (any sizes) or a float (B, 3, H, W) tensor in [-1, 1]."""
        label = self.label if category is None else self.label_of(category)
        tensors = _as_unit_tensors(images)
        model = self.model.eval()
        heads = model.roi_heads
        # detections under the threshold are never pasted back to image size: the costly part on a CPU
        heads.score_thresh, heads.detections_per_img = self.score_threshold, max(100, self.max_instances)
        out: list[Instances] = []
        for start in range(0, len(tensors), self.batch_size):
            batch = [t.to(self.device) for t in tensors[start:start + self.batch_size]]
            for found, x in zip(model(batch), batch):
                out.append(self._keep(found, label, tuple(x.shape[1:])))
        return out

    def predict_each(self, images: Sequence[np.ndarray]) -> list:
        """`predict` on the batch; if it raises, image by image: one Instances per image, or the exception of an
        image that fails alone (batch jobs and servers go on with the others)."""
        try:
            return list(self.predict(images))
        except Exception:
            return [self._predict_one(img) for img in images]

    def _predict_one(self, img: np.ndarray):
        try:
            return self.predict([img])[0]
        except Exception as e:
            return e

    def nothing_found(self) -> str:
        """Why an image has no predicted instance (the skip reason's detail)."""
        return (f"the segmenter found no {self.category} (score >= {self.score_threshold}, area >= {self.min_area} "
                f"px)")

    def _keep(self, found: dict[str, Tensor], label: int, hw: tuple[int, int]) -> Instances:
        keep = (found["labels"] == label) & (found["scores"] >= self.score_threshold)
        masks = found["masks"][keep, 0] >= MASK_THRESHOLD  # (K, H, W), detections come by decreasing score
        scores = found["scores"][keep]
        big = masks.flatten(1).sum(1) >= max(1, self.min_area)
        masks, scores = masks[big][:self.max_instances], scores[big][:self.max_instances]
        if not len(masks):
            return Instances(np.zeros((0, *hw), bool), np.zeros(0, np.float32))
        return Instances(masks.cpu().numpy(), scores.float().cpu().numpy())


def _as_unit_tensors(images: Sequence[np.ndarray] | Tensor) -> list[Tensor]:
    """uint8 (H, W, 3) arrays or a (B, 3, H, W) tensor in [-1, 1] -> float (3, H, W) tensors in [0, 1]."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        return list(images.float().add(1).div(2).clamp(0, 1))
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {i} must be a uint8 array (H, W, 3), got "
                             f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}")
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255))
    return out


# ---- the jobs' command line (jobs/translate.py, jobs/serve.py) ---------------------------------------------------

def add_arguments(p, use: str) -> None:
    """--segmenter, --category, --score-threshold and --min-instance-area on an argparse parser; `use` says when the
    segmenter is used (in --segmenter's help)."""
    p.add_argument("--segmenter", help="instance segmenter weights (torchvision COCO Mask R-CNN file or a "
                                       f"jobs/train_segmenter.py checkpoint) {use}")
    p.add_argument("--category", help="what the segmenter looks for: a COCO name or id (e.g. sheep), or the "
                                      "segmenter's own class (default: its only one)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="least segmenter score of a kept instance")
    p.add_argument("--min-instance-area", type=int, default=16, help="least pixels of a kept predicted instance")


def check_arguments(args) -> None:
    """The segmenter the parsed arguments name loads and knows --category, and the thresholds are in range (before
    Ray starts: the actors or replicas load it again); raises ValueError. A remote path (scheme://) is not read."""
    if "://" in args.segmenter:
        if not 0 <= args.score_threshold <= 1 or args.min_instance_area < 0:
            raise ValueError("--score-threshold must be in [0, 1] and --min-instance-area >= 0")
        return
    InstanceSegmenter.from_file(args.segmenter, category=args.category, score_threshold=args.score_threshold,
                                min_area=args.min_instance_area)
