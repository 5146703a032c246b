"""Evaluate a checkpoint's translations on a test split: metrics JSON and an image grid.

    python jobs/train_classifier.py --data-root /tmp/synth64 --out /tmp/clf.pt      # once per data set
    python jobs/evaluate.py --checkpoint <run>/checkpoint_XXXXXX --data-root /tmp/synth64 --classifier /tmp/clf.pt \
        --out /tmp/eval

Plain PyTorch, no Ray: it loads the checkpoint's G_ab and G_ba and translates the split's images a->b and b->a
sequentially (instagan.infer.Translator, `--ins-max` / `--ins-per` as at test time in the paper: 20 / 2). Writes
<out>/metrics.json with one row per translator - "model", the "identity" floor (output = input) and the "untrained"
floor (freshly initialised generators of the same config, seeded) - for both directions, plus the "real" row (the
classifier's accuracy on the real test images, as in the paper's Table 1), and <out>/grid.png (per direction:
real | real + masks | translated | translated + masks). Metric definitions: instagan/metrics.py and the "keys" field
of the JSON. Rows that fail to decode are skipped and listed under "skipped"; prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instagan import visual
from instagan.metrics import evaluate

SUMMARY_KEYS = ("cls", "cls_masked", "bg_err", "inst", "iou", "area_ratio", "mask_shape", "img_survive", "img_shape")


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
    p.add_argument("--out", default="eval", help="output folder for metrics.json and grid.png")
    a = p.parse_args(argv)
    if a.ins_max < 1 or a.ins_per < 1 or a.batch_size < 1 or (a.limit is not None and a.limit < 1):
        p.error("--ins-max, --ins-per, --batch-size and --limit must be >= 1")
    try:
        report, grid = evaluate(a.checkpoint, a.data_root, a.split, a.classifier, a.ins_max, a.ins_per, a.limit,
                                a.batch_size, device=a.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        raise SystemExit(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    visual.save_png(grid, out / "grid.png")
    brief = {"out": str(out), **summary(report)}
    print(json.dumps(brief))
    return brief


if __name__ == "__main__":
    main()
