"""Translation quality metrics (DESIGN.md section 7), the domain classifier they use, and the evaluation loop.

    from instagan.metrics import validation_metrics, load_classifier
    clf, meta = load_classifier("/tmp/clf.pt")                       # written by jobs/train_classifier.py
    validation_metrics(G_ab, G_ba, batch_a, batch_b, classifier=clf)  # {"val/bg_err_ab": ..., "val/score": ...}
    report = evaluate("ckpt/", "/tmp/synth", "test", "/tmp/clf.pt")  # what jobs/evaluate.py writes as JSON
    evaluate(..., fid_weights="pt_inception-2015-12-05-6726825d.pth")  # + fid / kid per row (instagan/fid.py)

Conventions: images (B, 3, H, W) in [-1, 1], masks (B, N, H, W) in [-1, 1] with valid (B, N) (instagan.masks); a
pixel belongs to an instance where its mask is > 0. Every metric is a pure function returning per-image (B,) or
per-instance (B, N) values; padding slots come back NaN or False, and means skip them. Plain PyTorch, no Ray.

- classification score: share of translated images the classifier calls the target domain (paper Table 1); the
  masked variant classifies `masked(img, union of the translated masks)`, background set to 0 (mid grey).
- background error: mean |x - y'| (in [-1, 1] units, so 0..2) over pixels that are background in both the input
  and the translated masks (the context-preserving loss's w = 1 region).
- instance preservation: an input instance is preserved if its translated mask is non-empty AND its area is within
  AREA_RATIO of the input's (a huge mask must not count); IoU between input and translated masks.
- image-based shapes (`flat_instance_shapes`): only for FLAT-COLOURED instances such as instagan.synthetic's
  ellipses and rectangles, meaningless on photos. Masks learn a shape change long before the image does, so this
  measures the shape in the translated pixels.
Pitfalls the evaluation guards against: generator artifacts fool a classifier trained on clean images (train it
with augmentation; always report the identity and the untrained-generator floors beside the model).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from instagan import masks as M
from instagan.fid import INCEPTION_FID, build_feature_net, features, fid_kid_features
from instagan.infer import Translation, Translator
from instagan.train import unwrap

AREA_RATIO = (0.25, 4.0)  # mask-based: a translated mask counts as preserved only within this area ratio
IMG_AREA_RATIO = (0.5, 2.0)  # image-based: the colour region survives within this area ratio
ELLIPSE_RECT = math.pi / 4  # area / bounding-box area of an axis-aligned ellipse (a rectangle: 1.0)
RECT_SPLIT = (1.0 + ELLIPSE_RECT) / 2  # rectangularity above this reads as a rectangle
TARGET = {"a2b": "b", "b2a": "a"}
MASK_MODES = ("instances", "union", "none")


# ---- pure metrics --------------------------------------------------------------------------------------------

def foreground(masks: Tensor, valid: Tensor) -> Tensor:
    """Binary instances: (B, N, H, W), (B, N) -> bool (B, N, H, W), False for padding."""
    return (masks > 0) & valid[:, :, None, None].bool()


def background_error(x: Tensor, y: Tensor, masks: Tensor, valid: Tensor, out_masks: Tensor,
                     out_valid: Tensor) -> Tensor:
    """Mean |x - y| over channels and the pixels that are background in both mask sets.

    x, y (B, 3, H, W); masks (B, N, H, W), valid (B, N); out_masks (B, M, H, W), out_valid (B, M) -> (B,), NaN
    for an image without such a pixel."""
    fg = foreground(masks, valid).any(1) | foreground(out_masks, out_valid).any(1)
    w = (~fg).to(x.dtype)[:, None]
    err = ((x - y).abs() * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * x.shape[1])
    return err  # 0 / 0 = NaN where every pixel is foreground


def instance_preservation(masks: Tensor, valid: Tensor, out_masks: Tensor, out_valid: Tensor,
                          ratio: tuple[float, float] = AREA_RATIO) -> tuple[Tensor, Tensor]:
    """Per input instance: preserved (translated mask non-empty and area ratio within `ratio`) and IoU.

    masks, out_masks (B, N, H, W) with slot n of out the translation of slot n; valid, out_valid (B, N) ->
    preserved (B, N) float (1/0, NaN where the slot is padding or was not translated), iou (B, N) (NaN likewise)."""
    a, b = foreground(masks, valid), foreground(out_masks, out_valid)
    area_a, area_b = a.sum((2, 3)).float(), b.sum((2, 3)).float()
    inter, union = (a & b).sum((2, 3)).float(), (a | b).sum((2, 3)).float()
    r = area_b / area_a.clamp(min=1)
    kept = (area_b > 0) & (r >= ratio[0]) & (r <= ratio[1])
    scored = valid.bool() & out_valid.bool() & (area_a > 0)
    nan = torch.full_like(r, float("nan"))
    return torch.where(scored, kept.float(), nan), torch.where(scored, inter / union.clamp(min=1), nan)


def area_ratio(masks: Tensor, valid: Tensor, out_masks: Tensor, out_valid: Tensor) -> Tensor:
    """Translated mask area / input mask area per instance (slot n of out translates slot n). (B, N, H, W),
    (B, N), (B, N, H, W), (B, N) -> (B, N), NaN where the slot is padding, untranslated or empty in the input."""
    a, b = foreground(masks, valid).sum((2, 3)).float(), foreground(out_masks, out_valid).sum((2, 3)).float()
    scored = valid.bool() & out_valid.bool() & (a > 0)
    return torch.where(scored, b / a.clamp(min=1), torch.full_like(a, float("nan")))


def rectangularity(masks: Tensor, valid: Tensor) -> Tensor:
    """Area / bounding-box area of each binary instance: 1.0 for an axis-aligned rectangle, pi/4 for an ellipse.
    (B, N, H, W), (B, N) -> (B, N), NaN for padding or an empty mask."""
    fg = foreground(masks, valid)
    rows, cols = fg.any(3), fg.any(2)  # (B, N, H), (B, N, W)

    def extent(v: Tensor) -> Tensor:
        idx = torch.arange(v.shape[-1], device=v.device)
        first = torch.where(v, idx, v.shape[-1]).amin(-1)
        last = torch.where(v, idx, -1).amax(-1)
        return (last - first + 1).clamp(min=0).float()

    box = extent(rows) * extent(cols)
    area = fg.sum((2, 3)).float()
    return torch.where(area > 0, area / box.clamp(min=1), torch.full_like(area, float("nan")))


def target_shape(rect: Tensor, target: str) -> Tensor:
    """1.0 where a rectangularity reads as domain `target`'s shape (b: rectangle, a: ellipse), NaN stays NaN."""
    hit = rect > RECT_SPLIT if target == "b" else rect <= RECT_SPLIT
    return torch.where(rect.isnan(), rect, hit.float())


def masked(img: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
    """The classifier's masked input: img * union of the instances (soft, in [0, 1]); background becomes 0.
    (B, 3, H, W), (B, N, H, W), (B, N) -> (B, 3, H, W)."""
    return img * M.union(masks.to(img.dtype), valid.bool())


def prob_b(logits: Tensor) -> Tensor:
    """P(domain b) from classifier logits: (B, 2) (softmax) or (B, 1) / (B,) (sigmoid) -> (B,)."""
    if logits.ndim == 2 and logits.shape[1] == 2:
        return logits.float().softmax(1)[:, 1]
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        return logits.float().reshape(-1).sigmoid()
    raise ValueError(f"classifier logits must be (B, 2), (B, 1) or (B,), got {tuple(logits.shape)}")


def classification_score(logits: Tensor, target: str) -> Tensor:
    """1.0 for each image the classifier calls domain `target` ("a" or "b"), else 0.0. logits as in prob_b -> (B,)."""
    if target not in ("a", "b"):
        raise ValueError(f"target must be 'a' or 'b', got {target!r}")
    p = prob_b(logits)
    return (p > 0.5).float() if target == "b" else (p <= 0.5).float()


def flat_instance_shapes(x: Tensor, y: Tensor, masks: Tensor, valid: Tensor, tol: float = 0.2, grow: float = 0.5,
                         ratio: tuple[float, float] = IMG_AREA_RATIO) -> dict[str, Tensor]:
    """Shapes measured in the translated IMAGE, for flat-coloured instances only (synthetic ellipses/rectangles;
    meaningless on photos).

    Per input instance: its colour c = median of x over its mask; the region = output pixels within max-channel
    distance max(tol, 1.5 * the instance's own colour spread) of c, inside its bounding box enlarged by `grow` of
    its size on each side; the largest 8-connected component of that region is the instance in y.
    x, y (B, 3, H, W); masks (B, N, H, W), valid (B, N) -> {"survive": 1/0 (area ratio region / input mask within
    `ratio`), "iou": region vs input mask, "rect": rectangularity of the region, "rect_in": of the input mask},
    each (B, N), NaN for padding ("rect" also NaN for an empty region)."""
    fg = foreground(masks, valid).cpu().numpy()
    xs, ys = x.detach().float().cpu().numpy(), y.detach().float().cpu().numpy()
    out = {k: np.full(fg.shape[:2], np.nan) for k in ("survive", "iou", "rect", "rect_in")}
    eight = np.ones((3, 3), bool)
    for b, n in zip(*np.nonzero(fg.any((2, 3)))):
        m = fg[b, n]
        colour = np.median(xs[b][:, m], axis=1)
        spread = np.abs(xs[b][:, m] - colour[:, None]).max(0)
        thr = max(tol, 1.5 * float(np.quantile(spread, 0.9)))
        r0, r1 = np.nonzero(m.any(1))[0][[0, -1]]
        c0, c1 = np.nonzero(m.any(0))[0][[0, -1]]
        dr, dc = max(2, int(grow * (r1 - r0 + 1))), max(2, int(grow * (c1 - c0 + 1)))
        win = np.zeros_like(m)
        win[max(0, r0 - dr):r1 + dr + 1, max(0, c0 - dc):c1 + dc + 1] = True
        region = win & (np.abs(ys[b] - colour[:, None, None]).max(0) <= thr)
        labels, count = ndimage.label(region, structure=eight)
        if count:
            region = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        area, area_in = region.sum(), m.sum()
        out["survive"][b, n] = float(ratio[0] <= area / area_in <= ratio[1])
        out["iou"][b, n] = (region & m).sum() / (region | m).sum()
        out["rect"][b, n] = _rect_np(region)
        out["rect_in"][b, n] = _rect_np(m)
    return {k: torch.from_numpy(v).float() for k, v in out.items()}


def _rect_np(m: np.ndarray) -> float:
    if not m.any():
        return float("nan")
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    return float(m.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))


# ---- the domain classifier ------------------------------------------------------------------------------------

def build_classifier(arch: str = "resnet18", weights: str | Path | None = None, num_classes: int = 2) -> nn.Module:
    """A torchvision classification model built with weights=None (nothing is downloaded); num_classes 2 (logits of
    a, b) or 1 (one logit of b). `weights`: a local state_dict file (or our classifier file) loaded with
    weights_only=True; the final linear head is skipped when its shape differs (e.g. ImageNet's 1000 classes).
    Any other missing or mismatched key is an error naming it."""
    import torchvision

    if num_classes not in (1, 2):
        raise ValueError(f"num_classes must be 1 or 2, got {num_classes}")
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise ValueError(f"unknown torchvision model {arch!r}: {e}") from None
    if weights is None:
        return model
    state = torch.load(Path(weights), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    head = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)][-1]
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]
    bad = [k for k in own if k not in state and not k.startswith(head + ".")]
    bad += [k for k in state if k not in own or (k not in skipped and state[k].shape != own[k].shape)]
    if bad:
        raise ValueError(f"{weights} does not fit torchvision {arch!r}: missing, unexpected or mismatched {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    return model


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A classifier written by jobs/train_classifier.py ({"state_dict", "meta": {arch, size, num_classes}}) ->
    (model in eval mode with `input_size` set, meta)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not a classifier file from jobs/train_classifier.py (no 'meta'/'state_dict')")
    meta = dict(blob["meta"])
    model = build_classifier(meta["arch"], num_classes=int(meta.get("num_classes", 2)))
    model.load_state_dict(blob["state_dict"])
    model.input_size = int(meta["size"])
    return model.to(device).eval(), meta


@torch.no_grad()
def classify(classifier: nn.Module, img: Tensor) -> Tensor:
    """Logits of images in [-1, 1] (B, 3, H, W), resized to the classifier's `input_size` if it has one and it
    differs. The classifier's train/eval mode is left as it was (it runs in eval mode)."""
    size = getattr(classifier, "input_size", None)
    if size and tuple(img.shape[-2:]) != (size, size):
        img = F.interpolate(img.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    device = next(classifier.parameters()).device
    mode = classifier.training
    try:
        return classifier.eval()(img.to(device, torch.float32)).float().cpu()
    finally:
        classifier.train(mode)


# ---- one direction, one batch -----------------------------------------------------------------------------------

def translate(G: nn.Module, batch: dict[str, Tensor], ins_max: int, ins_per: int):
    """(translation, mask_mode) of `batch` by G (DDP-wrapped or not; its train/eval mode is restored). G=None is
    the identity translation (input image and masks returned unchanged, mask_mode "instances")."""
    img, masks, valid = batch["img"], batch["masks"], batch["valid"].bool()
    if G is None:
        return Translation(img, masks, valid), "instances"
    G = unwrap(G)
    mode = G.training
    try:
        tr = Translator(G, ins_max, ins_per, next(G.parameters()).device)
        out = tr.translate(img, masks, valid)
    finally:
        G.train(mode)
    mask_mode = getattr(tr, "mask_mode", getattr(G, "mask_mode", "instances"))
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask_mode {mask_mode!r}, expected one of {MASK_MODES}")
    out.img, out.masks, out.valid = out.img.cpu(), out.masks.cpu(), out.valid.cpu()
    return out, mask_mode


def measure(batch: dict[str, Tensor], out, mask_mode: str, direction: str, classifier: nn.Module | None = None,
            shapes: bool = False, target: str | None = None) -> dict[str, Tensor]:
    """Per-item values of one translated batch: name -> 1-D tensor (per image or per instance, NaN-free), to be
    concatenated over batches and averaged (`summarise`). mask-based instance values only for mask_mode
    "instances"; "union" counts as a one-instance set for the background and masked classification, "none" uses
    the input masks there. target: the domain whose shape counts (default: the direction's target)."""
    x, masks, valid = batch["img"].float(), batch["masks"].float(), batch["valid"].bool()
    target = target or TARGET[direction]
    tm, tv = (masks, valid) if mask_mode == "none" else (out.masks.float(), out.valid.bool())
    vals = {"bg_err": background_error(x, out.img, masks, valid, tm, tv)}
    if mask_mode == "instances":
        kept, iou = instance_preservation(masks, valid, tm, tv)
        vals.update(inst=kept, iou=iou, area_ratio=area_ratio(masks, valid, tm, tv))
        if shapes:
            vals["mask_shape"] = torch.where(kept.isnan(), kept, kept * target_shape(rectangularity(tm, tv), target)
                                             .nan_to_num(0.0))
    if classifier is not None:
        vals["cls"] = classification_score(classify(classifier, out.img), target)
        vals["cls_masked"] = classification_score(classify(classifier, masked(out.img, tm, tv)), target)
    if shapes:
        s = flat_instance_shapes(x, out.img, masks, valid)
        hit = target_shape(s["rect"], target).nan_to_num(0.0)
        vals.update(img_survive=s["survive"], img_iou=s["iou"], img_rect=s["rect"], img_rect_in=s["rect_in"],
                    img_shape=torch.where(s["survive"].isnan(), s["survive"], s["survive"] * hit))
    return {k: v.flatten()[~v.flatten().isnan()] for k, v in vals.items()}


def summarise(parts: list[dict[str, Tensor]]) -> dict[str, float | None]:
    """Mean of each value over all batches' items (None where no item had one)."""
    keys = sorted({k for p in parts for k in p})
    out = {}
    for k in keys:
        v = torch.cat([p[k] for p in parts if k in p])
        out[k] = float(v.mean()) if v.numel() else None
    return out


@torch.no_grad()
def validation_metrics(G_ab: nn.Module, G_ba: nn.Module, batch_a: dict[str, Tensor], batch_b: dict[str, Tensor],
                       ins_max: int = 20, ins_per: int = 2, classifier: nn.Module | None = None) -> dict[str, float]:
    """Quick metrics on a small held-out set, both directions translated sequentially (no gradients; the modules'
    train/eval modes are restored). -> {"val/bg_err_ab", "val/bg_err_ba", "val/inst_ab", "val/inst_ba",
    ["val/cls_ab", "val/cls_ba" with a classifier], "val/score"}; score (higher is better, for ASHA) = mean
    classification score (if classifier) + mean instance preservation - mean background error. For generators
    without per-instance masks (mask_mode "union"/"none") the inst keys are left out and so is that term."""
    out: dict[str, float] = {}
    score = {"cls": [], "inst": [], "bg_err": []}
    for G, batch, direction, tag in ((G_ab, batch_a, "a2b", "ab"), (G_ba, batch_b, "b2a", "ba")):
        fake, mask_mode = translate(G, batch, ins_max, ins_per)
        vals = summarise([measure(batch, fake, mask_mode, direction, classifier)])
        for key in ("bg_err", "inst", "cls"):
            if vals.get(key) is not None:
                out[f"val/{key}_{tag}"] = vals[key]
                score[key].append(vals[key])
    out["val/score"] = sum(float(np.mean(v)) * (-1 if k == "bg_err" else 1) for k, v in score.items() if v)
    return out


# ---- evaluation of a checkpoint on a split (jobs/evaluate.py) -----------------------------------------------------

def load_split(root: str | Path, split: str, domain: str, size: int, limit: int | None = None,
               batch_size: int = 8) -> tuple[list[dict[str, Tensor]], list[dict]]:
    """Rows of one domain resized to size x size (no crop, no flip), as collated batches. A row that fails to
    decode or has no instance left is skipped and listed: ([batch], [{"domain", "id", "reason"}])."""
    from instagan.data import LocalDataset

    ds = LocalDataset(root, split, domain, size=size, load_size=size, flip=False, train=False)
    samples, skipped = [], []
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        try:
            img, m = ds[i]
        except Exception as e:  # one bad row must not stop the evaluation
            reason = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")  # the same text every time
            skipped.append({"domain": domain, "id": ds.ids[i], "reason": reason})
            continue
        if m.shape[0] == 0:
            skipped.append({"domain": domain, "id": ds.ids[i], "reason": f"no instance left at {size}x{size}"})
            continue
        samples.append((img, m))
    return [M.collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)], skipped


def _row(G: nn.Module | None, batches: list[dict[str, Tensor]], direction: str, classifier: nn.Module | None,
         ins_max: int, ins_per: int) -> tuple[dict, str, list]:
    parts, outs, mask_mode = [], [], "instances"
    for batch in batches:
        out, mask_mode = translate(G, batch, ins_max, ins_per)
        parts.append(measure(batch, out, mask_mode, direction, classifier, shapes=True))
        outs.append(out)
    vals = summarise(parts)
    for key in ("inst", "iou", "area_ratio", "mask_shape"):
        vals.setdefault(key, None)  # null for generators without per-instance masks (see "notes")
    vals["images"] = sum(int(b["img"].shape[0]) for b in batches)
    vals["instances"] = sum(int(b["valid"].sum()) for b in batches)
    return vals, mask_mode, outs


def evaluate(checkpoint_dir: str | Path, data_root: str | Path, split: str = "test",
             classifier: str | Path | nn.Module | None = None, ins_max: int = 20, ins_per: int = 2,
             limit: int | None = None, batch_size: int = 8, grid_rows: int = 4,
             device: str = "cpu", floors: bool = True, fid_weights: str | Path | None = None,
             fid_arch: str = INCEPTION_FID, fid_size: int | None = None,
             progress: bool = False) -> tuple[dict, Tensor]:
    """Translate a split a->b and b->a with a checkpoint's generators and with two floors (identity translation;
    untrained generators of the same config, seeded by its train.seed), and score them; the classifier's accuracy
    on the real images is the "real" row. -> (report dict, grid (3, H', W') in [0, 1]: per direction, input |
    input + masks | translated | translated + masks for the first `grid_rows` images, a2b above b2a, labelled and
    shown at 128 px or more). floors=False: the model row only (the floors do not change along a run).
    fid_weights: a local weights file of the feature network `fid_arch` (instagan.fid.build_feature_net; fid_size
    its input size): every row then also gets fid, kid_mean and kid_std of its translations against the real
    target-domain images of the split (a2b: real b). progress: a tqdm bar on stderr, one tick per row and direction."""
    from tqdm import tqdm

    from instagan import checkpoint, visual
    from instagan.train import build_networks

    cfg, payload = checkpoint.load(checkpoint_dir, device)
    trained = build_networks(cfg)
    for name in ("G_ab", "G_ba"):
        trained[name].load_state_dict(payload[name])
    untrained = build_networks(cfg)  # seeded by cfg.train.seed: the same floor every time
    clf_meta = None
    if isinstance(classifier, (str, Path)):
        classifier, clf_meta = load_classifier(classifier, device)
    data, skipped = _load_domains(data_root, split, cfg.data.size, limit, batch_size)
    fid = _FID(fid_weights, fid_arch, fid_size, data, batch_size, device) if fid_weights is not None else None
    rows: dict[str, dict] = {"model": {}, "identity": {}, "untrained": {}} if floors else {"model": {}}
    grids, mask_mode = [], "instances"
    bar = tqdm(total=2 * len(rows), desc="[evaluate]", unit="row", disable=not progress)
    for direction, d, g in (("a2b", "a", "G_ab"), ("b2a", "b", "G_ba")):
        for row, G in (("model", trained[g].to(device)), ("identity", None), ("untrained", untrained[g].to(device))):
            if row not in rows:
                continue
            bar.set_postfix_str(f"{row} {direction}")
            rows[row][direction], mode, outs = _row(G, data[d], direction, classifier, ins_max, ins_per)
            bar.update()
            if fid is not None:
                rows[row][direction].update(fid.score(None if G is None else [o.img for o in outs], d))
            if row == "model":
                mask_mode = mode
                grids += _grid_rows(data[d][0], outs[0], direction, grid_rows)
    bar.close()
    if floors:
        rows["real_target"] = _ceiling(data)
    if classifier is not None:
        rows["real"] = _real_accuracy(data, classifier)
    report = {
        "checkpoint": str(checkpoint_dir), "data_root": str(data_root), "split": split, "size": cfg.data.size,
        "arch": cfg.model.arch, "mask_mode": mask_mode, "ins_max": ins_max, "ins_per": ins_per,
        "classifier": clf_meta, "fid": None if fid is None else fid.meta, "rows": rows, "skipped": skipped,
        "notes": _notes(cfg.model.arch, mask_mode, classifier is not None) + ([] if fid is None else [fid.note()]),
        "keys": METRIC_KEYS, "config": cfg.to_dict(),
    }
    grid = visual.labelled_grid([cells for cells, _ in grids], list(GRID_COLUMNS), [label for _, label in grids],
                                scale=max(1, 128 // cfg.data.size))
    return report, grid


class _FID:
    """FID/KID of each row against the real target images, their features computed once per domain."""

    def __init__(self, weights: str | Path, arch: str, size: int | None, data: dict, batch_size: int, device: str):
        self.net, self.batch_size, self.device = build_feature_net(arch, weights, size), batch_size, device
        self.real = {d: self.features([b["img"] for b in data[d]]) for d in ("a", "b")}
        self.meta = {"arch": arch, "weights": str(weights), "num_features": self.net.num_features,
                     "size": 299 if self.net.uint8 else self.net.size}

    def features(self, images: list[Tensor]) -> Tensor:
        return features(images, self.net, self.batch_size, self.device)

    def score(self, translated: list[Tensor] | None, source: str) -> dict:
        """fid, kid_mean, kid_std, kid_subset_size of the translations of domain `source` (None: the identity,
        the source images themselves) against the real images of the other domain."""
        fake = self.real[source] if translated is None else self.features(translated)
        return fid_kid_features(fake, self.real["b" if source == "a" else "a"])

    def note(self) -> str:
        n = min(len(v) for v in self.real.values())
        return (f"fid, kid_mean, kid_std: {self.meta['arch']} features ({self.meta['weights']}) of the translated "
                f"images vs the real target-domain images of the split (a2b: real b); the identity row compares "
                f"the input images themselves. On {n} images FID is biased upward: compare the rows of this report, "
                f"not published FIDs (those use the standard Inception on thousands of images)")


def _load_domains(root, split: str, size: int, limit: int | None, batch_size: int) -> tuple[dict, list[dict]]:
    """{"a": batches, "b": batches} of a split and the rows skipped; ValueError when a domain has no usable image."""
    data, skipped = {}, []
    for d in ("a", "b"):
        data[d], bad = load_split(root, split, d, size, limit, batch_size)
        skipped += bad
        if not data[d]:
            raise ValueError(f"no usable image in {root}/{split}/{d} (skipped: {bad[:3]})")
    return data, skipped


def _grid_rows(batch: dict[str, Tensor], fake: Translation, direction: str, n: int) -> list[tuple[list, str]]:
    """The grid cells (input, input + masks, translated, translated + masks) of the first n images, labelled."""
    from instagan import visual

    return [([visual.to_unit(batch["img"][i]), visual.overlay(batch["img"][i], batch["masks"][i], batch["valid"][i]),
              visual.to_unit(fake.img[i]), visual.overlay(fake.img[i], fake.masks[i], fake.valid[i])],
             f"{direction} #{i}") for i in range(min(n, batch["img"].shape[0]))]


def _ceiling(data: dict) -> dict:
    """The shape measures of real target-domain images, as they are: the ceiling of the shape metrics."""
    out = {}
    for direction, d in (("a2b", "b"), ("b2a", "a")):
        parts = [measure(batch, Translation(batch["img"], batch["masks"], batch["valid"].bool()), "instances",
                         direction, shapes=True, target=d) for batch in data[d]]
        out[direction] = {k: v for k, v in summarise(parts).items()
                          if k in ("mask_shape", "img_shape", "img_survive", "img_rect")}
    return out


def _real_accuracy(data: dict, classifier: nn.Module) -> dict:
    """The classifier's accuracy on the real images of each domain, plain and masked."""
    out = {}
    for d in ("a", "b"):
        hit, hit_m = [], []
        for batch in data[d]:
            hit.append(classification_score(classify(classifier, batch["img"]), d))
            hit_m.append(classification_score(classify(classifier, masked(batch["img"], batch["masks"],
                                                                           batch["valid"])), d))
        out[d] = {"acc": float(torch.cat(hit).mean()), "acc_masked": float(torch.cat(hit_m).mean())}
    return out


def _notes(arch: str, mask_mode: str, has_classifier: bool) -> list[str]:
    notes = [] if has_classifier else ["no classifier given: cls, cls_masked and the real row are left out"]
    if mask_mode != "instances":
        notes.append(f"model.arch {arch!r} predicts {'one union mask' if mask_mode == 'union' else 'no mask'}"
                     " per image, not one per instance: mask-based instance metrics (inst, iou, mask_shape) are null"
                     + ("; bg_err and cls_masked use the input masks" if mask_mode == "none" else
                        "; bg_err and cls_masked use the translated union as a one-instance set"))
    notes.append("img_* are image-based shape measures for flat-coloured instances (synthetic ellipses/rectangles); "
                 "meaningless on photos")
    return notes


METRIC_KEYS = {  # what each metric of evaluate's report means (the report's "keys")
    "cls": "share of translated images the classifier calls the target domain",
    "cls_masked": "the same on translated image x union of translated masks (background 0)",
    "bg_err": "mean |x - y'| in [-1, 1] units over pixels background in input and translated masks",
    "inst": f"share of input instances whose translated mask is non-empty with area ratio in {AREA_RATIO}",
    "iou": "mean IoU of input and translated masks",
    "area_ratio": "mean translated / input mask area per instance",
    "mask_shape": "share of instances preserved whose translated mask has the target shape (rectangularity)",
    "img_survive": f"image-based: share of instances whose colour region keeps area ratio in {IMG_AREA_RATIO}",
    "img_iou": "image-based: IoU of the colour region and the input mask",
    "img_rect": "image-based: area / bounding box of the colour region (rectangle 1.0, ellipse 0.785)",
    "img_rect_in": "the same for the input masks",
    "img_shape": "image-based: share of instances that survive with the target domain's shape",
    "real": "classifier accuracy on the real images (acc_masked: on image x union of real masks)",
    "fid": "Frechet distance of the translated and the real target-domain images' features (lower is better)",
    "kid_mean": "kernel inception distance (polynomial-kernel MMD^2, unbiased) of the same features, mean over "
                "random subsets of kid_subset_size images (lower is better; near 0 or below: no difference seen)",
    "kid_std": "its standard deviation over the subsets (0 when a subset is the whole set)",
    "real_target": "the shape measures of REAL target-domain test images (a2b: real b, b2a: real a), the ceiling of a "
                   "translator whose outputs look like the target domain: occluded instances do not read as their "
                   "domain's shape",
}


GRID_COLUMNS = ("input", "input + masks", "translated", "translated + masks")


def summary_table(report: dict, keys: tuple[str, ...] = ("img_shape", "mask_shape", "bg_err", "inst", "img_survive"),
                  ) -> str:
    """The rows of an `evaluate` report (model and floors) as a Markdown table of `keys` per direction."""
    cols = [(k, d) for k in keys for d in ("a2b", "b2a")]
    lines = ["| row | " + " | ".join(f"{k} {d}" for k, d in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row, dirs in report["rows"].items():
        if row == "real":
            continue
        vals = [dirs.get(d, {}).get(k) for k, d in cols]
        lines.append(f"| {row} | " + " | ".join(_fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    """3 decimals; 3 significant digits below 0.01 (KID values are often that small)."""
    return "-" if v is None else f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2e}"


REPORT_KEYS = ("fid", "kid_mean", "cls", "cls_masked", "img_shape", "mask_shape", "bg_err", "inst", "img_survive")


def markdown_report(report: dict, command: str | None = None, grid: str | None = "grid.png") -> str:
    """A self-contained Markdown page of an `evaluate` report: what was evaluated and how (`command`), the
    metrics table with its floors, what each metric means, the grid image (a link relative to the page) and the
    model config."""
    rows = report["rows"]
    shown = tuple(k for k in REPORT_KEYS if any(v.get(k) is not None for r, dirs in rows.items() if r != "real"
                                                for v in dirs.values()))
    n = {d: rows["model"][d]["images"] for d in ("a2b", "b2a")}
    out = [f"# Evaluation of `{report['checkpoint']}`", "",
           f"The `{report['split']}` split of `{report['data_root']}` at {report['size']} x {report['size']} px: "
           f"{n['a2b']} images a->b, {n['b2a']} images b->a (unreadable rows skipped: {len(report['skipped'])}), model "
           f"`{report['arch']}`, ins_max {report['ins_max']}, ins_per {report['ins_per']}."]
    if command:
        out += ["", "Command:", "", "```", command, "```"]
    out += ["", "## Metrics", "",
            "Rows: `model` is the checkpoint; the floors are `identity` (the input unchanged) and `untrained` "
            "(freshly initialised generators of the same config); `real_target` measures the real target-domain "
            "images as they are (the ceiling of the shape measures). A number means something only beside its "
            "floors.", "", summary_table(report, shown)]
    if "real" in rows:
        out += ["", "Classifier accuracy on the real images:", "", "| domain | acc | acc_masked |", "|---|---|---|"]
        out += [f"| {d} | {_fmt(v['acc'])} | {_fmt(v['acc_masked'])} |" for d, v in rows["real"].items()]
    if report.get("fid"):
        f = report["fid"]
        out += ["", f"FID/KID feature network: `{f['arch']}` ({f['num_features']} features at {f['size']} px) "
                    f"from `{f['weights']}`."]
    out += ["", "What the metrics mean:", ""] + [f"- `{k}`: {report['keys'][k]}" for k in shown if k in report["keys"]]
    out += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    if grid:
        out += ["", "## Translations", "", f"Per direction and image: {' | '.join(GRID_COLUMNS)}.", "",
                f"![translations a->b above b->a]({grid})"]
    if report.get("config"):
        out += ["", "## Config", "", "The checkpoint's config.json (model, losses, training, data):", "",
                "```json", json.dumps(report["config"], indent=2), "```"]
    return "\n".join(out) + "\n"


def write_evaluation(report: dict, grid: Tensor, out: str | Path, command: str | None = None) -> Path:
    """<out>/metrics.json, <out>/grid.png and <out>/report.md (markdown_report) of an `evaluate` result; -> the
    grid's path."""
    from instagan import visual

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    path = visual.save_png(grid, out / "grid.png")
    (out / "report.md").write_text(markdown_report(report, command, path.name))
    return path


def evaluate_run_end(checkpoint_dir: str | Path, data_root: str | Path, out: str | Path, split: str = "test",
                     limit: int | None = 60, fid_weights: str | Path | None = None,
                     fid_arch: str = INCEPTION_FID) -> tuple[dict, Path] | None:
    """The end of a training run: evaluate its last checkpoint on `split` of its data (at most `limit` images per
    domain) against the floors (with FID/KID given fid_weights), write <out>/metrics.json, <out>/grid.png and
    <out>/report.md. None when the split is missing."""
    if "://" in str(data_root) or not all(any((Path(data_root) / split / d).glob("part-*.parquet")) for d in "ab"):
        return None
    report, grid = evaluate(checkpoint_dir, data_root, split, limit=limit, fid_weights=fid_weights,
                            fid_arch=fid_arch)
    return report, write_evaluation(report, grid, out)
