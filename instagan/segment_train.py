"""Training and evaluating an instance segmenter (instagan.segment) on a data_prep Parquet set: plain PyTorch, no
Ray. jobs/train_segmenter.py runs the same loop on Ray Train workers (instagan.distributed.segment) or, with
--local, here in one process.

    cfg = SegmentConfig.from_dict({"data": {"root": "/tmp/synth64", "domains": "a"}, "train": {"steps": 200}})
    seg = train_local(cfg, "/tmp/runs/seg")            # -> InstanceSegmenter; checkpoints in the run folder
    evaluate_segmenter(seg, "/tmp/synth64", "test", "a")   # {"iou": ..., "recall": ..., "precision": ...}

Classes: one per trained domain (`data.domains`: a, b or ab), named after the data set's categories
(metadata.json, e.g. "ellipse"), label 0 the background. Samples: the Parquet row decoded (instagan.data.read_sample)
at its own size, a random horizontal flip, boxes from the masks; Mask R-CNN resizes to its working size itself.

Recipes: from scratch (model.init "") AdamW at 2e-3, linear warm-up then cosine decay to 0; from torchvision's COCO
weights (model.init = the file) the same backbone and heads with new predictors for the classes, usually with
train.optimizer sgd and lr 5e-3 (torchvision's detection tutorial). Measured on the generated set (600 images of
64 px, ellipses of domain a): the small arch from scratch, 200 steps of 4 images (158 s on one core of a busy
2-core machine), on the 60 test images (198 instances): mean matched IoU 0.84, instance recall 0.87, precision
0.87, mask AP 0.61 (AP50 0.87).

Metrics (`evaluate_segmenter`): per image, predicted and true instances are paired one to one by the Hungarian
assignment on mask IoU; a pair with IoU >= 0.5 is a match. iou = mean IoU of the matches, recall = matches / true
instances, precision = matches / predicted instances, iou_all = the sum of matched IoUs / true instances (misses
count 0), mask_ap / mask_ap50 = COCO mask AP (pycocotools) over the category.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import masks_to_boxes

from instagan.config import Sections
from instagan.data import LocalDataset, read_sample
from instagan.segment import (ARCHS, CHECKPOINT_FILE, SMALL_WIDTH, InstanceSegmenter, build_model, load_state,
                              replace_classes)

SEGMENTER_FILE = CHECKPOINT_FILE  # in a checkpoint folder: the segmenter alone (what --segmenter loads)
TRAINING_FILE = "training.pt"  # in a checkpoint folder: optimizer, step and epoch (to resume)


# ---- config ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegModelConfig:
    arch: str = "small"  # small | maskrcnn_resnet50_fpn | maskrcnn_resnet50_fpn_v2 (instagan.segment.ARCHS)
    init: str = ""  # weights file to fine-tune from (torchvision's COCO file or a segmenter checkpoint); "" = scratch
    size: int = 0  # working size, the shorter side after the model's resize; 0 = the arch's (small 128, R50 800)
    width: int = SMALL_WIDTH  # small arch: FPN and head channels


@dataclass(frozen=True)
class SegTrainConfig:
    steps: int = 600  # optimizer steps in all
    batch_size: int = 4  # images per step and worker
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    lr: float = 2e-3  # peak learning rate
    warmup: int = 50  # steps of linear warm-up, then cosine decay to 0 at `steps`
    weight_decay: float = 1e-4
    flip: bool = True  # random horizontal flips
    seed: int = 0  # weights, sample order and flips
    score_threshold: float = 0.5  # detections kept when evaluating


@dataclass(frozen=True)
class SegDataConfig:
    root: str = ""  # data_prep Parquet set; "" = generated ellipses/rectangles in <run folder>/data (the job)
    split: str = "train"  # trained on
    test_split: str = "test"  # evaluated at the end; "" = none
    domains: str = "a"  # whose masks are learnt: a, b or ab (one class per domain)
    eval_images: int = 0  # test images per domain evaluated; 0 = all


@dataclass(frozen=True)
class SegRunConfig:
    name: str = "segmenter"  # run folder <storage_path>/<name>
    storage_path: str = ""  # "" = ~/ray_results
    workers: int = 2  # Ray Train DDP workers
    cpus_per_worker: float = 0.5  # fractional on small machines (2 x 1 CPU hangs Ray Data on 2 cores)
    use_gpu: bool = False
    log_every: int = 20  # steps between metrics lines
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    num_to_keep: int = 2  # checkpoints kept by Ray Train
    max_failures: int = 1  # worker-group restarts inside one run


_SECTIONS = {"model": SegModelConfig, "train": SegTrainConfig, "data": SegDataConfig, "run": SegRunConfig}


@dataclass(frozen=True)
class SegmentConfig(Sections):
    SECTIONS: ClassVar[dict[str, type]] = _SECTIONS
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    run: SegRunConfig = field(default_factory=SegRunConfig)

    def __post_init__(self) -> None:
        m, t, d, r = self.model, self.train, self.data, self.run
        checks = [(m.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got {m.arch!r}"),
                  (m.size == 0 or m.size >= 32, f"model.size must be 0 or >= 32, got {m.size}"),
                  (m.width >= 8, f"model.width must be >= 8, got {m.width}"),
                  (min(t.steps, t.batch_size) >= 1, "train.steps and train.batch_size must be >= 1"),
                  (t.optimizer in ("adamw", "sgd"), f"train.optimizer must be adamw or sgd, got {t.optimizer!r}"),
                  (math.isfinite(t.lr) and t.lr > 0, f"train.lr must be a finite number > 0, got {t.lr}"),
                  (t.warmup >= 0 and t.weight_decay >= 0, "train.warmup and train.weight_decay must be >= 0"),
                  (0 <= t.score_threshold <= 1, f"train.score_threshold must be in [0, 1], got {t.score_threshold}"),
                  (d.domains in ("a", "b", "ab"), f"data.domains must be a, b or ab, got {d.domains!r}"),
                  (d.eval_images >= 0, "data.eval_images must be >= 0"),
                  (bool(r.name) and "/" not in r.name, f"run.name must be a folder name, got {r.name!r}"),
                  (r.workers >= 0 and r.cpus_per_worker > 0, "run.workers >= 0 and run.cpus_per_worker > 0"),
                  (min(r.log_every, r.checkpoint_every, r.num_to_keep) >= 1,
                   "run.log_every, run.checkpoint_every and run.num_to_keep must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---- data ------------------------------------------------------------------------------------------------------

def class_names(root: str, domains: str) -> list[str]:
    """["__background__", one name per domain]: the domain's categories in metadata.json joined by "+", else its
    letter (a URI, or no metadata)."""
    meta = Path(root) / "metadata.json" if "://" not in root else None
    cats = json.loads(meta.read_text()).get("categories", {}) if meta is not None and meta.is_file() else {}
    return ["__background__"] + ["+".join(cats.get(d) or [d]) for d in domains]


def to_sample(img: np.ndarray, masks: np.ndarray, label: int, flip: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """uint8 (H, W, 3), bool (K, H, W) -> Mask R-CNN's input: image float (3, H, W) in [0, 1] and its target
    (boxes (K, 4) x1 y1 x2 y2 around the pixels, labels (K,), masks uint8 (K, H, W)); empty masks dropped."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255)
    m = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
    m = m[m.flatten(1).any(1)] if len(m) else m
    if flip:
        x, m = x.flip(-1), m.flip(-1)
    boxes = masks_to_boxes(m) if len(m) else torch.zeros(0, 4)
    boxes[:, 2:] += 1  # pixel edges: a one-pixel-wide instance still has a positive width
    return x, {"boxes": boxes, "labels": torch.full((len(m),), label, dtype=torch.int64), "masks": m.to(torch.uint8)}


def sample_rng(seed: int, epoch: int, rank: int) -> random.Random:
    return random.Random(f"segment/{seed}/{epoch}/{rank}")


def local_rows(root: str, split: str, domains: str) -> list[tuple[int, LocalDataset, int]]:
    """Every (label, dataset, row index) of the split's domains, label = 1 + position in `domains`."""
    sets = {d: LocalDataset(root, split, d) for d in domains}
    return [(1 + domains.index(d), ds, i) for d, ds in sets.items() for i in range(len(ds))]


def local_epoch(rows: Sequence[tuple[int, LocalDataset, int]], batch_size: int, seed: int, epoch: int, flip: bool,
                skip: int = 0) -> Iterator[tuple[list[Tensor], list[dict]]]:
    """One epoch of full batches in a seeded order; the first `skip` batches are passed over undecoded (resume)."""
    rng = sample_rng(seed, epoch, 0)
    order = list(range(len(rows)))
    rng.shuffle(order)
    flips = [flip and rng.random() < 0.5 for _ in order]
    for b in range(skip, len(order) // batch_size):
        batch = [to_sample(*read_sample(rows[order[j]][1].row(rows[order[j]][2])), rows[order[j]][0], flips[j])
                 for j in range(b * batch_size, (b + 1) * batch_size)]
        yield [x for x, _ in batch], [t for _, t in batch]


# ---- training --------------------------------------------------------------------------------------------------

def build_for_training(cfg: SegmentConfig, classes: Sequence[str]) -> InstanceSegmenter:
    """The segmenter to train: random weights (model.init "") or model.init's weights with new predictors for
    `classes` when its classes differ. Seeded by train.seed, so every rank builds the same weights."""
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    if not m.init:
        layout = "scratch"
        model = build_model(m.arch, len(classes), layout, m.size, m.width)
    else:
        start = InstanceSegmenter.from_file(m.init, arch=m.arch, size=m.size, category=1)
        model, layout = start.model, start.layout
        if list(start.classes) != list(classes):
            replace_classes(model, len(classes))
    return InstanceSegmenter(model, m.arch, classes, category=1, layout=layout, width=m.width,
                             score_threshold=cfg.train.score_threshold)


def make_optimizer(model: torch.nn.Module, t: SegTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_at(step: int, t: SegTrainConfig) -> float:
    """Linear warm-up over train.warmup steps, then cosine decay to 0 at train.steps."""
    warm = min(1.0, (step + 1) / t.warmup) if t.warmup else 1.0
    return t.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, t.steps) / t.steps))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: list[Tensor], targets: list[dict],
               lr: float) -> dict[str, float]:
    """One optimizer step on a batch; model may be DDP-wrapped. -> {"loss/<term>": value, "loss/total": sum}."""
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    out = {f"loss/{k.removeprefix('loss_')}": float(v.detach()) for k, v in losses.items()}
    out["loss/total"] = float(total.detach())
    return out


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step belongs to
    in_epoch: int = 0  # batches of that epoch done


def write_checkpoint(folder: Path, seg: InstanceSegmenter, opt: torch.optim.Optimizer, progress: Progress,
                     cfg: SegmentConfig) -> None:
    """A checkpoint folder: segmenter.pt (what jobs/translate.py --segmenter loads), training.pt, config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    seg.save(folder / SEGMENTER_FILE)
    torch.save({"optimizer": opt.state_dict(), **dataclasses.asdict(progress)}, folder / TRAINING_FILE)
    (folder / "config.json").write_text(cfg.to_json() + "\n")


def read_checkpoint(folder: Path, seg: InstanceSegmenter, opt: torch.optim.Optimizer) -> Progress:
    """Load a checkpoint folder into seg and opt (weights_only=True); -> where training stands."""
    ckpt = torch.load(folder / SEGMENTER_FILE, map_location="cpu", weights_only=True)
    load_state(seg.model, ckpt["state_dict"], folder / SEGMENTER_FILE, seg.arch)
    state = torch.load(folder / TRAINING_FILE, map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return Progress(state["step"], state["epoch"], state["in_epoch"])


def run_loop(cfg: SegmentConfig, seg: InstanceSegmenter, model: torch.nn.Module, opt: torch.optim.Optimizer,
             progress: Progress, epoch_batches: Callable[[int, int], Iterable[tuple[list, list]]],
             report: Callable[[dict, bool], None], average: Callable[[dict], dict] = lambda m: m) -> Progress:
    """The training loop shared by one process and Ray Train workers: steps until train.steps, epochs of
    `epoch_batches(epoch, skip)`, every run.log_every steps `report(metrics, checkpoint=False)`, every
    run.checkpoint_every steps and at the end `report(metrics, checkpoint=True)`; every rank calls report at the
    same steps. `average` averages metrics over ranks. model: seg.model, or it wrapped in DDP."""
    t, r = cfg.train, cfg.run
    sums: dict[str, float] = {}
    count, t0 = 0, time.perf_counter()
    while progress.step < t.steps:
        any_batch = False
        for images, targets in epoch_batches(progress.epoch, progress.in_epoch):
            any_batch = True
            device = seg.device
            losses = train_step(model, opt, [x.to(device) for x in images],
                                [{k: v.to(device) for k, v in tg.items()} for tg in targets], lr_at(progress.step, t))
            progress.step += 1
            progress.in_epoch += 1
            count += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            last = progress.step >= t.steps
            if progress.step % r.log_every == 0 or progress.step % r.checkpoint_every == 0 or last:
                metrics = average({k: v / count for k, v in sums.items()})
                metrics.update({"step": progress.step, "epoch": progress.epoch, "lr": lr_at(progress.step - 1, t),
                                "time/step_s": (time.perf_counter() - t0) / count})
                report(metrics, progress.step % r.checkpoint_every == 0 or last)
                sums, count, t0 = {}, 0, time.perf_counter()
            if last:
                return progress
        if not any_batch and progress.in_epoch == 0:
            raise ValueError(f"no full batch of {t.batch_size} images in the training split {cfg.data.split!r}")
        progress.epoch += 1
        progress.in_epoch = 0
    return progress


def train_local(cfg: SegmentConfig, folder: str | Path, device: str = "cpu", resume: bool = True,
                log: Callable[[str], None] = print) -> InstanceSegmenter:
    """Train in this process without Ray; checkpoints (folder/checkpoint_stepXXXXXXXX/) and metrics.jsonl in
    `folder`, resuming from its latest checkpoint when `resume`. Ends with the test split's metrics (test/*)
    in metrics.jsonl and eval.json. -> the trained segmenter."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.to_json() + "\n")
    d = cfg.data
    classes = class_names(d.root, d.domains)
    seg = build_for_training(cfg, classes)
    seg.model.to(device)
    seg.device = torch.device(device)
    opt = make_optimizer(seg.model, cfg.train)
    found = sorted(p for p in folder.glob("checkpoint_step*") if (p / TRAINING_FILE).is_file())
    progress = read_checkpoint(found[-1], seg, opt) if resume and found else Progress()
    if resume and found:
        log(f"[segment] resuming from {found[-1]} (step {progress.step})")
    rows = local_rows(d.root, d.split, d.domains)

    def report(metrics: dict, checkpoint: bool) -> None:
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        log(f"[segment] step {metrics['step']}/{cfg.train.steps} loss {metrics['loss/total']:.3f} "
            f"({metrics['time/step_s']:.2f} s/step)")
        if checkpoint:
            write_checkpoint(folder / f"checkpoint_step{progress.step:08d}", seg, opt, progress, cfg)

    run_loop(cfg, seg, seg.model, opt, progress,
             lambda epoch, skip: local_epoch(rows, cfg.train.batch_size, cfg.train.seed, epoch, cfg.train.flip, skip),
             report)
    if d.test_split:
        result = evaluate_segmenter(seg, d.root, d.test_split, d.domains, d.eval_images)
        (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({f"test/{k}": v for k, v in result.items()} | {"step": progress.step}) + "\n")
        log(f"[segment] test split: {json.dumps(result)}")
    return seg


# ---- evaluation ------------------------------------------------------------------------------------------------

def match_instances(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> list[float]:
    """bool (P, H, W) predictions and (T, H, W) truths -> the IoUs of the matches: a one-to-one Hungarian
    assignment maximising IoU, pairs under `threshold` left unmatched."""
    from scipy.optimize import linear_sum_assignment

    if not len(pred) or not len(true):
        return []
    p = pred.reshape(len(pred), -1).astype(np.float32)
    t = true.reshape(len(true), -1).astype(np.float32)
    inter = p @ t.T
    iou = inter / np.maximum(p.sum(1)[:, None] + t.sum(1)[None] - inter, 1.0)
    rows, cols = linear_sum_assignment(-iou)
    return [float(iou[i, j]) for i, j in zip(rows, cols) if iou[i, j] >= threshold]


def mask_ap(truths: list[np.ndarray], preds: list[Any]) -> tuple[float, float]:
    """COCO mask AP (0.5:0.95) and AP50 of one category with pycocotools: truths bool (K, H, W) per image, preds
    Instances per image. -> (ap, ap50); -1.0 where undefined (no truth)."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(m: np.ndarray) -> dict:
        return mask_util.encode(np.asfortranarray(m.astype(np.uint8)))

    images, anns, dets = [], [], []
    for i, (truth, pred) in enumerate(zip(truths, preds)):
        h, w = truth.shape[1:]
        images.append({"id": i, "height": int(h), "width": int(w)})
        for m in truth:
            r = rle(m)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "segmentation": r, "iscrowd": 0,
                         "area": float(m.sum()), "bbox": list(mask_util.toBbox(r))})
        for m, s in zip(pred.masks, pred.scores):
            dets.append({"image_id": i, "category_id": 1, "segmentation": rle(m), "score": float(s)})
    if not anns:
        return -1.0, -1.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
        gt.createIndex()
        if not dets:
            return 0.0, 0.0
        ev = COCOeval(gt, gt.loadRes(dets), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def evaluate_segmenter(seg: InstanceSegmenter, root: str, split: str, domains: str = "a", images: int = 0,
                       iou_threshold: float = 0.5) -> dict[str, Any]:
    """The split's instances of each domain against the segmenter's predictions of that domain's class (see the
    module docstring for the metrics). images: first N rows per domain (0 = all). -> a flat dict; with several
    domains the totals plus "<domain>/<metric>" keys."""
    out: dict[str, Any] = {}
    totals = {"matched": 0, "iou_sum": 0.0, "true": 0, "predicted": 0, "images": 0, "seconds": 0.0}
    for d in domains:
        ds = LocalDataset(root, split, d)
        n = len(ds) if not images else min(images, len(ds))
        truths, preds, seconds = [], [], 0.0
        for start in range(0, n, seg.batch_size):
            items = [read_sample(ds.row(i)) for i in range(start, min(n, start + seg.batch_size))]
            t0 = time.perf_counter()
            preds += seg.predict([img for img, _ in items], category=1 + domains.index(d))
            seconds += time.perf_counter() - t0
            truths += [m for _, m in items]
        ious = [iou for t, p in zip(truths, preds) for iou in match_instances(p.masks, t, iou_threshold)]
        ap, ap50 = mask_ap(truths, preds)
        part = {"matched": len(ious), "iou_sum": sum(ious), "true": sum(len(t) for t in truths),
                "predicted": sum(len(p.masks) for p in preds), "images": n, "seconds": seconds}
        if len(domains) > 1:
            out.update({f"{d}/{k}": v for k, v in _summary(part).items()})
            out.update({f"{d}/mask_ap": ap, f"{d}/mask_ap50": ap50})
        else:
            out.update(mask_ap=ap, mask_ap50=ap50)
        totals = {k: totals[k] + part[k] for k in totals}
    return {**_summary(totals), **out}


def _summary(c: dict) -> dict[str, Any]:
    return {"iou": round(c["iou_sum"] / c["matched"], 4) if c["matched"] else 0.0,
            "recall": round(c["matched"] / c["true"], 4) if c["true"] else 0.0,
            "precision": round(c["matched"] / c["predicted"], 4) if c["predicted"] else 0.0,
            "iou_all": round(c["iou_sum"] / c["true"], 4) if c["true"] else 0.0,
            "images": c["images"], "instances": c["true"], "predicted": c["predicted"],
            "images_per_s": round(c["images"] / c["seconds"], 2) if c["seconds"] else None}
