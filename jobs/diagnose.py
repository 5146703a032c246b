"""Why a run's images lag its masks: D's verdict on image-only and mask-only inputs and the gradient each loss
sends to the generator's image and mask decoders, at every checkpoint of a run (instagan/diagnose.py).

    python jobs/diagnose.py --run /tmp/ablate/runs/instagan_paper --data-root /tmp/ablate/data
    python jobs/diagnose.py --probe --data-root /tmp/ablate/data [--config configs/ablations/instagan_paper.yaml]
    python jobs/diagnose.py --follow /tmp/ablate/runs/instagan/checkpoint_step00000482 --data-root /tmp/ablate/data
    python jobs/diagnose.py --follow CKPT --data-root DATA --set model.layers=true --no-change   # the base alone

Writes <run>/diagnose.json and <run>/diagnose.png, prints one JSON line per checkpoint. --probe instead trains fresh
judges on real data only (a discriminator's image path, its joint head on boxes drawn over ellipses, the
segmenter) and prints how fast each learns the shape difference (instagan.diagnose.probe). --follow CKPT prints
one JSON line: how far that checkpoint's a->b image follows its translated masks (instagan.diagnose.follow); with
--set the same weights run with other lever keys (those that add no weights), with --no-change the image decoder's
change is zeroed, so the image is the paint's base alone.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from instagan.config import Config
from instagan.diagnose import diagnose_run, follow, probe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python jobs/diagnose.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run folder with checkpoint_step* folders (jobs/ablate.py, --local)")
    p.add_argument("--probe", action="store_true", help="train fresh judges on real data instead (no --run)")
    p.add_argument("--follow", metavar="CKPT", help="does this checkpoint's a->b image follow its masks (no --run)")
    p.add_argument("--config", default="configs/ablations/instagan_paper.yaml", help="--probe: the networks' config")
    p.add_argument("--steps", type=int, default=300, help="--probe: training steps")
    p.add_argument("--data-root", required=True, help="the data_prep Parquet set it trained on")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=16, help="held-out images per domain")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="--follow: a config key changed before the generator is built (repeatable)")
    p.add_argument("--no-change", action="store_true", help="--follow: the image decoder's change zeroed")
    a = p.parse_args(argv)
    if a.follow:
        try:
            sets = {}
            for item in a.set:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
                sets[key] = yaml.safe_load(value)
            stats = follow(a.follow, a.data_root, a.split, images=60, sets=sets, no_change=a.no_change)
            print(json.dumps({k: round(v, 3) for k, v in stats.items()}))
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if a.probe:
        cfg = Config.from_file(a.config).replace(**{"data.root": a.data_root, "data.split": "train"})
        curves = probe(a.data_root, cfg, a.steps, images=a.images)
        for i, step in enumerate(curves["step"]):
            print(json.dumps({k: round(v[i], 3) for k, v in curves.items()}))
        return 0
    if not a.run:
        p.error("--run is required (or --probe)")
    try:
        report = diagnose_run(a.run, a.data_root, a.images, a.split)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for pt in report["points"]:
        print(json.dumps({k: pt[k] for k in ("step", "D_b_gap", "grad_norm") if k in pt}))
    print(f"wrote {a.run}/diagnose.json and {a.run}/diagnose.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
