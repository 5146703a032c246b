"""`coco` source: a COCO instances json plus its image folder; two categories become domains a and b.

    python -m data_prep coco --annotations ../shared/data/fruits_nuts_coco/trainval.json \\
        --images ../shared/data/fruits_nuts_coco/images --a date --b fig --out /tmp/fruits

An image goes to domain a with its instances of the --a categories as masks (other objects are background), and to
domain b likewise; with --exclusive an image holding both goes to neither. Segmentations may be polygons,
uncompressed or compressed RLE (decoded with pycocotools). Crowd annotations are skipped and counted unless
--include-crowd; an image whose only domain annotations are crowd ones is not used. The split is a seeded hash of
the image id (--test-fraction), or --split NAME for all (e.g. --split test for COCO's val json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from data_prep.rows import BadInput, Options, Result, UsageError, make_row, quarantine_row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", type=Path, required=True, help="COCO instances json")
    p.add_argument("--images", type=Path, required=True, help="folder holding the json's file_name entries")
    p.add_argument("--a", required=True, help="category name(s) or id(s) of domain a, comma-separated")
    p.add_argument("--b", required=True, help="category name(s) or id(s) of domain b, comma-separated")
    p.add_argument("--exclusive", action="store_true", help="an image with both a and b goes to neither")
    p.add_argument("--include-crowd", action="store_true", help="keep iscrowd=1 annotations as instances")
    p.add_argument("--min-area", type=int, default=1, help="drop smaller instances (pixels, source resolution)")
    add_split_arguments(p)


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of images hashed into the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash")
    p.add_argument("--split", default=None, help="put every image in this split instead")


def split_of(image_id: str, args: argparse.Namespace) -> str:
    """Seeded hash of the id: stable across runs and machines, independent of input order."""
    if args.split:
        return args.split
    h = int.from_bytes(hashlib.sha256(f"{args.seed}/{image_id}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < args.test_fraction else "train"


def resolve_categories(spec: str, cats: dict[int, str], flag: str) -> list[int]:
    """'date,3' -> [1, 3]: names (exact, then case-insensitive) or ids; unknown ones are a usage error."""
    by_name = {n: i for i, n in cats.items()}
    by_lower = {n.lower(): i for i, n in cats.items()}
    ids = []
    for tok in (t.strip() for t in spec.split(",") if t.strip()):
        if tok in by_name:
            ids.append(by_name[tok])
        elif tok.lower() in by_lower:
            ids.append(by_lower[tok.lower()])
        elif tok.lstrip("-").isdigit() and int(tok) in cats:
            ids.append(int(tok))
        else:
            known = ", ".join(f"{n} ({i})" for i, n in sorted(cats.items()))
            raise UsageError(f"unknown category {tok!r} for {flag}; the file has: {known}")
    if not ids:
        raise UsageError(f"{flag} names no category")
    return ids


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"annotation file {path} not found") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read annotation file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise UsageError(f"{path} is not a COCO instances file (needs 'images' and 'categories' lists)")
    return data


def plan(args: argparse.Namespace) -> tuple[list, dict, list]:
    data = _load_json(args.annotations)
    if not args.images.is_dir():
        raise UsageError(f"image folder {args.images} not found")
    cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    dom = {"a": resolve_categories(args.a, cats, "--a"), "b": resolve_categories(args.b, cats, "--b")}
    if set(dom["a"]) & set(dom["b"]):
        raise UsageError("--a and --b share a category")
    domain_of = {c: d for d, ids in dom.items() for c in ids}
    src = str(args.annotations)
    quarantine, images = [], {}
    for img in data["images"]:
        iid = img.get("id")
        if iid in images:
            quarantine.append(quarantine_row(iid, src, "duplicate_id", f"image id repeated ({img.get('file_name')})"))
        elif "file_name" not in img:
            quarantine.append(quarantine_row(iid, src, "missing_file", "image record without file_name"))
        else:
            images[iid] = img
    anns: dict = defaultdict(lambda: {"a": [], "b": []})
    seen_ann, skipped, annotated = set(), Counter(), set()
    for ann in data.get("annotations", []):
        aid, cid, iid = ann.get("id"), ann.get("category_id"), ann.get("image_id")
        annotated.add(iid)
        where = f"{src}#annotation={aid}"
        if aid is not None and aid in seen_ann:
            quarantine.append(quarantine_row(iid, where, "duplicate_id", "annotation id repeated", "instance"))
            continue
        seen_ann.add(aid)
        if cid not in cats:
            quarantine.append(quarantine_row(iid, where, "unknown_category", f"category_id {cid}", "instance"))
        elif iid not in images:
            quarantine.append(quarantine_row(iid, where, "missing_file", "annotation of an unlisted image",
                                             "instance"))
        elif cid in domain_of:
            anns[iid][domain_of[cid]].append(ann)
    tasks = []
    for iid, img in images.items():
        by_dom = anns.get(iid)
        if by_dom is None:
            skipped["no_domain_category"] += 1
            continue
        if args.exclusive and by_dom["a"] and by_dom["b"]:
            skipped["excluded_both"] += 1
            continue
        tasks.append((str(iid), str(args.images / img["file_name"]), img.get("height"), img.get("width"),
                      split_of(str(iid), args), {d: by_dom[d] for d in "ab" if by_dom[d]},
                      {c: cats[c] for c in domain_of}, args.include_crowd))
    info = {"categories": {d: [cats[c] for c in ids] for d, ids in dom.items()},
            "_skipped": dict(skipped), "inputs": {"annotations": src, "images": str(args.images)},
            # images with no annotation of any category (an image_info json has none): unlabelled, not empty
            "_unannotated": [(str(i), str(args.images / img["file_name"])) for i, img in images.items()
                             if i not in annotated]}
    return tasks, info, quarantine


def ann_to_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE -> bool (h, w), as pycocotools' COCO.annToMask does."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]  # a polygon needs 3 points
        if not polys:
            raise BadInput("empty_mask", "no polygon with 3 or more points")
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise BadInput("size_mismatch", f"RLE size {seg['size']}, image {h}x{w}")
        if isinstance(seg["counts"], list):
            rle = mask_util.frPyObjects(seg, h, w)
        else:
            counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
            rle = {"size": [h, w], "counts": counts}
    else:
        raise BadInput("bad_segmentation", f"unsupported segmentation {type(seg).__name__}")
    with warnings.catch_warnings():  # pycocotools' own NumPy 2 copy= deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_util.decode(rle).astype(bool)


def convert(task: tuple, opts: Options) -> Result:
    iid, path, jh, jw, split, by_dom, names, include_crowd = task
    res = Result()
    pic = res.image(iid, path)
    if pic is None:
        return res
    h, w = pic.size
    if (jh, jw) != (None, None) and (jh, jw) != (h, w):
        # polygons are in the json's coordinates: rasterising them on another size would misplace every mask
        res.bad(iid, path, "size_mismatch", f"json says {jh}x{jw}, file is {h}x{w}")
        return res
    for domain, anns in by_dom.items():
        masks, cats = [], set()
        for ann in anns:
            where = f"{path}#annotation={ann.get('id')}"
            if ann.get("iscrowd") and not include_crowd:
                res.count("crowd")
                continue
            try:
                masks.append((ann_to_mask(ann, h, w), where))
                cats.add(names[ann["category_id"]])
            except BadInput as e:
                res.bad(iid, where, e.reason, e.detail, "instance")
            except Exception as e:  # malformed polygon or counts: pycocotools raises assorted errors
                res.bad(iid, where, "bad_segmentation", f"{type(e).__name__}: {e}", "instance")
        if not masks and all(a.get("iscrowd") for a in anns) and not include_crowd:
            res.count("crowd_only_image")
            continue
        row = make_row(iid, pic, masks, ",".join(sorted(cats)), path, opts, res)
        if row is not None:
            res.rows.append((split, domain, row))
    return res
