"""`folder` source: data sets already laid out for the InstaGAN authors' code.

    python -m data_prep folder ../shared/data/shp2gir_coco_sample --out /tmp/shp2gir --a-name sheep --b-name giraffe

Every `<phase>A` folder with a sibling `<phase>A_seg` (and the same for B) under ROOT is converted: images
`<phase>A/<id>.<ext>` (any image extension), one mask per instance `<phase>A_seg/<id>_<k>.<ext>`, k = 0, 1, ...
The phase name (train, test, sample, ...) becomes the split, A becomes domain a and B domain b. Masks are
thresholded (the authors' masks carry grey resampled pixels, some are RGB): a pixel is an instance pixel when its
brightest channel is >= --threshold.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.rows import MASK_FORMATS, BadInput, Options, Result, UsageError, make_row, open_image, quarantine_row

PAIR = re.compile(r"^(?P<phase>.+)(?P<dom>[AB])$")
MASK = re.compile(r"^(?P<id>.+)_(?P<k>\d+)$")
IMAGE_EXTS = {e.lower() for e in Image.registered_extensions()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="folder holding <phase>A, <phase>A_seg, <phase>B, <phase>B_seg")
    p.add_argument("--phases", default=None, help="comma-separated phases to convert (default: every one found)")
    p.add_argument("--a-name", default="A", help="category name stored for domain a (e.g. sheep)")
    p.add_argument("--b-name", default="B", help="category name stored for domain b (e.g. giraffe)")
    p.add_argument("--threshold", type=int, default=128, help="mask pixels >= this (0-255) are instance pixels")
    p.add_argument("--min-area", type=int, default=1, help="drop smaller instances (pixels, source resolution)")


def by_stem(folder: Path, quarantine: list, kind: str) -> dict[str, Path]:
    """Image files of a folder by stem; a stem seen twice (1.png and 1.jpg) keeps the first name, quarantines others."""
    out: dict[str, Path] = {}
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        if f.stem in out:
            quarantine.append(quarantine_row(f.stem, f, "duplicate_id", f"also {out[f.stem].name}", kind))
        else:
            out[f.stem] = f
    return out


def plan(args: argparse.Namespace) -> tuple[list, dict, list]:
    root = args.root
    if not root.is_dir():
        raise UsageError(f"folder {root} not found")
    phases = set(args.phases.split(",")) if args.phases else None
    pairs, lonely = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = PAIR.match(d.name)
        if not m or (phases and m["phase"] not in phases):
            continue
        seg = root / f"{d.name}_seg"
        (pairs if seg.is_dir() else lonely).append((m["phase"], "a" if m["dom"] == "A" else "b", d, seg))
    if not pairs:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:20]) or "nothing"
        raise UsageError(f"no <phase>A + <phase>A_seg (or B) folder pair under {root}; found: {found}")
    names = {"a": args.a_name, "b": args.b_name}
    quarantine, tasks = [], []
    for phase, dom, img_dir, seg_dir in pairs:
        images = by_stem(img_dir, quarantine, "image")
        masks: dict[str, dict[int, Path]] = defaultdict(dict)
        for stem, f in by_stem(seg_dir, quarantine, "instance").items():
            m = MASK.match(stem)
            if not m:
                quarantine.append(quarantine_row(stem, f, "bad_mask_name", "expected <id>_<k>.<ext>", "instance"))
            elif m["id"] not in images:
                quarantine.append(quarantine_row(m["id"], f, "missing_file", f"no image {m['id']}.* in {img_dir}",
                                                 "instance"))
            else:
                masks[m["id"]][int(m["k"])] = f
        for stem, path in images.items():
            if not masks.get(stem):
                quarantine.append(quarantine_row(stem, path, "no_instances", f"no {stem}_<k> mask in {seg_dir}"))
                continue
            mask_paths = [str(masks[stem][k]) for k in sorted(masks[stem])]
            tasks.append((stem, str(path), mask_paths, phase, dom, names[dom], args.threshold))
    info = {"categories": {d: [n] for d, n in names.items()}, "inputs": {"root": str(root)},
            "folders": sorted({f"{p[2].name}" for p in pairs}), "ignored_folders": sorted(p[2].name for p in lonely)}
    return tasks, info, quarantine


def load_mask(path: Path, threshold: int) -> np.ndarray:
    """A PNG mask file in any mode -> bool (H, W): brightest channel >= threshold (16-bit files scaled to 8 bits)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput("missing_file", f"{path} not found") from None
    except OSError as e:
        raise BadInput("unreadable_mask", str(e)) from None
    try:
        im = open_image(raw, MASK_FORMATS)
        im.load()
    except BadInput as e:
        raise BadInput("unreadable_mask" if e.reason == "unreadable_image" else e.reason, e.detail) from None
    except Exception as e:
        raise BadInput("unreadable_mask", f"{type(e).__name__}: {e}") from None
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        return a >= (threshold * 257 if a.max() > 255 else threshold)
    a = np.asarray(im.convert("L") if im.mode in ("L", "1") else im.convert("RGB"))
    return (a.max(axis=-1) if a.ndim == 3 else a) >= threshold


def convert(task: tuple, opts: Options) -> Result:
    iid, path, mask_paths, split, domain, category, threshold = task
    res = Result()
    pic = res.image(iid, path)
    if pic is None:
        return res
    masks = []
    for mp in mask_paths:
        try:
            masks.append((load_mask(Path(mp), threshold), mp))
        except BadInput as e:
            res.bad(iid, mp, e.reason, e.detail, "instance")
    row = make_row(iid, pic, masks, category, path, opts, res)
    if row is not None:
        res.rows.append((split, domain, row))
    return res
