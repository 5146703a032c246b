"""Evaluate a checkpoint's translations on a test split: metrics JSON, an image grid and a Markdown report.

    python jobs/train_classifier.py --data-root /tmp/synth64 --out /tmp/clf.pt      # once per data set
    python jobs/evaluate.py --checkpoint <run>/checkpoint_XXXXXX --data-root /tmp/synth64 --classifier /tmp/clf.pt \
        --out /tmp/eval [--fid-weights pt_inception-2015-12-05-6726825d.pth]

Plain PyTorch, no Ray: it loads the checkpoint's G_ab and G_ba and translates the split's images a->b and b->a
sequentially (instagan.infer.Translator, `--ins-max` / `--ins-per` as at test time in the paper: 20 / 2). Writes
<out>/metrics.json with one row per translator - "model", the "identity" floor (output = input) and the "untrained"
floor (freshly initialised generators of the same config, seeded) - for both directions, plus the "real" row (the
classifier's accuracy on the real test images, as in the paper's Table 1), and <out>/grid.png (per direction:
real | real + masks | translated | translated + masks). With --fid-weights (a LOCAL file: nothing is downloaded) every
row also gets FID and KID of its translations against the real target-domain images of the split, in the features of
--fid-arch (instagan/fid.py: "inception-fid", the standard FID network, or a torchvision model name). <out>/report.md
puts the table with its floors, the grid, this command line and the model config on one page. Metric definitions:
instagan/metrics.py and the "keys" field of the JSON. Rows that fail to decode are skipped and listed under
"skipped"; prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from instagan.fid import INCEPTION_FID
from instagan.metrics import evaluate, write_evaluation

SUMMARY_KEYS = ("fid", "kid_mean", "cls", "cls_masked", "bg_err", "inst", "iou", "area_ratio", "mask_shape",
                "img_survive", "img_shape")


def summary(report: dict) -> dict:
    """The headline numbers: per row and direction, SUMMARY_KEYS rounded to 3 digits."""
    rows = {}
    for row, dirs in report["rows"].items():
        if row == "real":
            rows[row] = {d: {k: round(v, 3) for k, v in vals.items()} for d, vals in dirs.items()}
            continue
        rows[row] = {d: {k: None if vals.get(k) is None else round(vals[k], 3) for k in SUMMARY_KEYS if k in vals}
                     for d, vals in dirs.items()}
    return {"rows": rows, "skipped": len(report["skipped"]), "notes": report["notes"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (state.pt + config.json)")
    p.add_argument("--data-root", required=True, help="Parquet data set written by data_prep")
    p.add_argument("--split", default="test")
    p.add_argument("--classifier", default=None, help="classifier file from jobs/train_classifier.py "
                   "(without it cls, cls_masked and the real row are left out)")
    p.add_argument("--ins-max", type=int, default=20)
    p.add_argument("--ins-per", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="at most this many images per domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="eval", help="output folder for metrics.json, grid.png and report.md")
    p.add_argument("--fid-weights", default=None, help="local weights file of the FID/KID feature network "
                   "(without it no fid/kid); e.g. pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--fid-arch", default=INCEPTION_FID, help=f"{INCEPTION_FID!r} (the standard FID InceptionV3) "
                   "or a torchvision model name whose state_dict --fid-weights holds (resnet18, inception_v3, ...)")
    p.add_argument("--fid-size", type=int, default=None, help="input size of a torchvision feature network "
                   "(default 299 for inception_v3, else 224)")
    args = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(args)
    if min(v for v in (a.ins_max, a.ins_per, a.batch_size, a.limit, a.fid_size) if v is not None) < 1:
        p.error("--ins-max, --ins-per, --batch-size, --limit and --fid-size must be >= 1")
    try:
        report, grid = evaluate(a.checkpoint, a.data_root, a.split, a.classifier, a.ins_max, a.ins_per, a.limit,
                                a.batch_size, device=a.device, fid_weights=a.fid_weights, fid_arch=a.fid_arch,
                                fid_size=a.fid_size, progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        raise SystemExit(2)
    write_evaluation(report, grid, a.out, shlex.join(["python", "jobs/evaluate.py", *args]))
    brief = {"out": a.out, **summary(report)}
    print(json.dumps(brief))
    return brief


if __name__ == "__main__":
    main()
