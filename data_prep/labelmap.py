"""`labelmap` source: images plus per-pixel category maps (PNG or .mat), e.g. Clothing Co-Parsing (CCP).

    python -m data_prep labelmap --images ccp/photos --labels ccp/annotations/pixel-level \\
        --names ccp/label_list.mat --a pants --b skirt --out /tmp/ccp

A label file `<id>.png` (one category index per pixel: mode L, P or I) or `<id>.mat` (array under --key, CCP:
`groundtruth`) pairs with the image `<id>.<ext>` in --images. Category names come from --names: a .mat cell array
(CCP: `label_list.mat`, key --names-key `label_list`, index 0 = background), or a text file with one name per line
(line i = label i). An instance is a connected component (--connectivity 8 or 4) of one category with at least
--min-area pixels; smaller components are dropped and counted. Images without a label file are not used (CCP has
image-level-only photos); label values beyond the names list are reported as unknown_category and ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import io as sio
from scipy import ndimage

from data_prep.coco import add_split_arguments, resolve_categories, split_of
from data_prep.folder import by_stem
from data_prep.rows import BadInput, Options, Result, UsageError, load_image, make_row, quarantine_row

LABEL_EXTS = {".png", ".bmp", ".tif", ".tiff", ".mat"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="image folder")
    p.add_argument("--labels", type=Path, required=True, help="label-map folder (<id>.png or <id>.mat)")
    p.add_argument("--names", type=Path, default=None, help="category names: .mat cell array or text, one per line")
    p.add_argument("--names-key", default="label_list", help="variable holding the names in a --names .mat")
    p.add_argument("--key", default="groundtruth", help="variable holding the label map in <id>.mat")
    p.add_argument("--a", required=True, help="category name(s) or index(es) of domain a, comma-separated")
    p.add_argument("--b", required=True, help="category name(s) or index(es) of domain b, comma-separated")
    p.add_argument("--exclusive", action="store_true", help="an image with both a and b goes to neither")
    p.add_argument("--min-area", type=int, default=100, help="smallest component kept (pixels, source resolution)")
    p.add_argument("--connectivity", type=int, choices=(4, 8), default=8)
    add_split_arguments(p)


def read_names(path: Path, key: str) -> list[str]:
    """Category names by label index from a .mat cell array or a text file."""
    if not path.exists():
        raise UsageError(f"names file {path} not found")
    if path.suffix.lower() != ".mat":
        return [line.strip() for line in path.read_text().splitlines()]
    try:
        mat = sio.loadmat(str(path))
    except Exception as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if key not in mat:
        raise UsageError(f"{path} has no variable {key!r} (has: {', '.join(k for k in mat if not k.startswith('_'))})")
    names = []
    for cell in np.asarray(mat[key], dtype=object).ravel():
        flat = np.asarray(cell).ravel()
        names.append(str(flat[0]) if flat.size else "")
    return names


def plan(args: argparse.Namespace) -> tuple[list, dict, list]:
    for flag, d in (("--images", args.images), ("--labels", args.labels)):
        if not d.is_dir():
            raise UsageError(f"{flag} folder {d} not found")
    names = read_names(args.names, args.names_key) if args.names else None
    cats = dict(enumerate(names)) if names else {}
    if names:
        dom = {"a": resolve_categories(args.a, cats, "--a"), "b": resolve_categories(args.b, cats, "--b")}
    else:
        try:
            dom = {d: [int(t) for t in s.split(",")] for d, s in (("a", args.a), ("b", args.b))}
        except ValueError:
            raise UsageError("without --names, --a and --b must be label indexes (e.g. --a 3 --b 7)") from None
        cats = {c: str(c) for ids in dom.values() for c in ids}
    if set(dom["a"]) & set(dom["b"]):
        raise UsageError("--a and --b share a category")
    quarantine: list = []
    images = by_stem(args.images, quarantine, "image")
    labels: dict[str, Path] = {}
    for f in sorted(p for p in args.labels.iterdir() if p.is_file() and p.suffix.lower() in LABEL_EXTS):
        if f.stem in labels:
            quarantine.append(quarantine_row(f.stem, f, "duplicate_id", f"also {labels[f.stem].name}", "label"))
        else:
            labels[f.stem] = f
    if not labels:
        raise UsageError(f"no label map (.png/.mat) in {args.labels}")
    tasks = []
    for stem, lab in labels.items():
        if stem not in images:
            quarantine.append(quarantine_row(stem, lab, "missing_file", f"no image {stem}.* in {args.images}"))
            continue
        tasks.append((stem, str(images[stem]), str(lab), split_of(stem, args), args.key, dom,
                      {c: cats[c] for ids in dom.values() for c in ids}, len(names) if names else None,
                      args.min_area, args.connectivity, args.exclusive))
    info = {"categories": {d: [cats[c] for c in ids] for d, ids in dom.items()},
            "_skipped": {"image_without_label": len(set(images) - set(labels))},
            "inputs": {"images": str(args.images), "labels": str(args.labels), "names": str(args.names)}}
    return tasks, info, quarantine


def load_labels(path: Path, key: str) -> np.ndarray:
    """Label map -> int (H, W). RGB colour-coded maps are refused: their colours would need a palette table."""
    try:
        if path.suffix.lower() == ".mat":
            mat = sio.loadmat(str(path))
            if key not in mat:
                raise BadInput("unreadable_label", f"no variable {key!r}")
            a = np.asarray(mat[key])
        else:
            im = Image.open(path)
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise BadInput("unreadable_label", f"mode {im.mode}: expected one category index per pixel")
            a = np.asarray(im)
    except BadInput:
        raise
    except FileNotFoundError:
        raise BadInput("missing_file", f"{path} not found") from None
    except Exception as e:
        raise BadInput("unreadable_label", f"{type(e).__name__}: {e}") from None
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
        raise BadInput("unreadable_label", f"expected a 2-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def convert(task: tuple, opts: Options) -> Result:
    iid, path, lab_path, split, key, dom, names, n_names, min_area, connectivity, exclusive = task
    res = Result()
    try:
        pic = load_image(Path(path))
        labels = load_labels(Path(lab_path), key)
    except BadInput as e:
        res.bad(iid, lab_path if e.reason == "unreadable_label" else path, e.reason, e.detail)
        return res
    if labels.shape != pic.size:
        res.bad(iid, lab_path, "size_mismatch", f"label map {labels.shape}, image {pic.size}")
        return res
    if n_names is not None:
        unknown = np.unique(labels[(labels < 0) | (labels >= n_names)])
        if unknown.size:
            res.bad(iid, lab_path, "unknown_category", f"label values {unknown[:10].tolist()} (pixels ignored)",
                    "label")
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    found: dict[str, list] = {}
    for domain, ids in dom.items():
        comps, cats = [], set()
        for c in ids:
            lab, n = ndimage.label(labels == c, structure=structure)
            if n == 0:
                continue
            sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            for k in np.flatnonzero(sizes >= min_area):
                comps.append((lab == k + 1, f"{lab_path}#label={c}/component={k}"))
                cats.add(names[c])
            res.count("small_instance", int((sizes < min_area).sum()))
        if comps:
            found[domain] = (comps, cats)
    if exclusive and len(found) == 2:
        res.count("excluded_both")
        return res
    if not found:
        res.count("no_domain_category")
    for domain, (comps, cats) in found.items():
        row = make_row(iid, pic, comps, ",".join(sorted(cats)), path, opts, res)
        if row is not None:
            res.rows.append((split, domain, row))
    return res
